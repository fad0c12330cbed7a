"""tinygpt export --format gguf: the file reads back with gguf's own reader (keys, tensor names, shapes,
types),
and transformers' GGUF loader computes tinygpt's logits for the architectures it supports (gpt2, qwen3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_flags
from tinygpt import run as tinygpt_run
from tinygpt.cli import main

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def field(reader, key):
    return reader.fields[key].contents()


def export(tmp_path, text_file, preset: str, *extra: str, dtype: str = "f32"):
    run = tmp_path / preset
    assert main(["train", "--preset", preset, "--data", str(text_file), "--data.vocab_size", "300", "--out",
                 str(run),
                 *tiny_flags(**{"model.n_embd": 32}), *extra]) == 0
    out = tmp_path / f"{preset}-{dtype}.gguf"
    assert main(["export", "--run", str(run), "--format", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
    return tinygpt_run.load(run, device="cpu"), out


@pytest.mark.parametrize("preset, extra, arch", [("gpt2", (), "gpt2"), ("modern", (), "qwen3"),
                                                 ("modern", ("--model.mlp", "relu2"), "apertus")])
def test_gguf_reads_back_with_keys_and_shapes(tmp_path, text_file, preset, extra, arch):
    ckpt, path = export(tmp_path, text_file, preset, *extra)
    reader = gguf.GGUFReader(path)
    cfg = ckpt.config.model
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == cfg.n_layer
    assert field(reader, f"{arch}.embedding_length") == cfg.n_embd
    assert field(reader, f"{arch}.context_length") == cfg.block_size
    assert field(reader, f"{arch}.attention.head_count") == cfg.n_head
    assert field(reader, "tokenizer.ggml.eos_token_id") == ckpt.tokenizer.eot_id
    assert len(field(reader, "tokenizer.ggml.tokens")) == cfg.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert tuple(tensors["token_embd.weight"].shape) == (cfg.n_embd, cfg.vocab_size)  # ggml order: reversed
    qkv = ["attn_qkv"] if arch == "gpt2" else ["attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm"]
    ffn = ["ffn_up", "ffn_down"] + (["ffn_gate"] if arch == "qwen3" else [])
    for i in range(cfg.n_layer):
        for name in ["attn_norm", "attn_output", "ffn_norm", *qkv, *ffn]:
            assert f"blk.{i}.{name}.weight" in tensors, name
    if arch == "apertus":  # llama.cpp's apertus has no tied fallback, and needs the xIELU constants
        assert "output.weight" in tensors
        assert np.allclose(field(reader, "xielu.alpha_p"), [np.log(np.e - 1)] * cfg.n_layer)
    if arch == "gpt2":
        assert "blk.0.attn_qkv.bias" in tensors and "position_embd.weight" in tensors


@pytest.mark.parametrize("preset, extra, arch", [("gpt2", (), "gpt2"), ("modern", (), "qwen3")])
def test_transformers_gguf_loader_reproduces_logits(tmp_path, text_file, preset, extra, arch):
    pytest.importorskip("accelerate")
    ckpt, path = export(tmp_path, text_file, preset, *extra)
    # transformers' GGUF config mapping misses small models' head_dim (qwen3 falls back to 128) and maps
    # context_length to n_ctx while gpt2's position table follows n_positions: fix both, then pass config=.
    hf_cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    m = ckpt.config.model
    if arch == "qwen3":
        hf_cfg.head_dim = m.n_embd // m.n_head
    else:
        hf_cfg.n_positions = m.block_size
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              config=hf_cfg).eval()
    idx = torch.randint(0, m.vocab_size, (2, m.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ckpt.model(idx)[0] - model(idx).logits.float()).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.2e}"


@pytest.mark.parametrize("dtype, ggml_type", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_smaller_dtypes_keep_norms_in_f32(tmp_path, text_file, dtype, ggml_type):
    _, path = export(tmp_path, text_file, "modern", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == ggml_type and types["blk.0.attn_norm.weight"] == "F32"


def test_gguf_refusals(tmp_path, text_file, capsys):
    run = tmp_path / "lite"
    assert main(["train", "--preset", "gpt-lite", "--data", str(text_file), "--out", str(run),
                 *tiny_flags()]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert "post-LN" in err and err.count("\n") == 1 and not (tmp_path / "x.gguf").exists()
