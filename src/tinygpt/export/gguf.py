"""Export a run as one GGUF file for llama.cpp and Ollama: weights, architecture metadata, tokenizer and chat
template, written with the `gguf` package (an extra: `pip install tinygpt[export]`).

The architecture is the one llama.cpp computes exactly for this network (export/targets.py): gpt2, qwen3
(SwiGLU) or apertus (relu2). Linear weights go in as stored ([out, in]; gguf reverses the dims for ggml).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from tinygpt.checkpoint import Checkpoint
from tinygpt.data.templates import ChatTemplate
from tinygpt.errors import UsageError
from tinygpt.export.output import staged
from tinygpt.export.targets import Family, family_of, with_zero_biases
from tinygpt.export.vocab import GGUFVocab, TokenType, gguf_vocab, write_vocab
from tinygpt.model import ROPE_BASE, mlp_hidden

DTYPES = ("f32", "f16", "q8_0")


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF export needs the gguf package: pip install 'tinygpt[export]' (or pip install "
                         "gguf)") from None
    return gguf


def tensor_names(family: Family, n_layer: int) -> dict[str, str]:
    """tinygpt parameter name -> GGUF tensor name (the c_attn and c_fc splits are handled by gguf_tensors)."""
    names = {"transformer.wte.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    ln = ("weight", "bias") if family.name == "gpt2" else ("weight",)
    names |= {f"transformer.ln_f.{p}": f"output_norm.{p}" for p in ln}
    if family.name == "gpt2":
        names["transformer.wpe.weight"] = "position_embd.weight"
    for i in range(n_layer):
        t, g = f"transformer.h.{i}.", f"blk.{i}."
        names |= ({t + f"ln_1.{p}": g + f"attn_norm.{p}" for p in ln}
                  | {t + f"ln_2.{p}": g + f"ffn_norm.{p}" for p in ln})
        for p in ("weight", "bias") if family.name == "gpt2" else ("weight",):
            names |= {t + f"attn.c_proj.{p}": g + f"attn_output.{p}",
                      t + f"mlp.c_proj.{p}": g + f"ffn_down.{p}",
                      t + f"attn.c_attn.{p}": g + f"attn_qkv.{p}", t + f"mlp.c_fc.{p}": g + f"ffn_up.{p}"}
        if family.name != "gpt2":
            names |= {t + "attn.q_norm.weight": g + "attn_q_norm.weight",
                      t + "attn.k_norm.weight": g + "attn_k_norm.weight"}
    return names


def gguf_tensors(model: torch.nn.Module, family: Family) -> dict[str, np.ndarray]:
    """Every tensor llama.cpp's architecture needs, float32. gpt2 requires every bias (zeros stand in for a
    bias-free model); apertus requires output.weight even when the head is tied; qwen3 and apertus take q, k,
    v as three tensors and qwen3 the SwiGLU gate apart from up."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if family.name == "gpt2":
        sd = with_zero_biases(sd)
    if cfg.tie_weights and family.name != "apertus":
        sd.pop("lm_head.weight")  # absent output.weight = tied, for gpt2 and qwen3
    out = {}
    for name, gname in tensor_names(family, cfg.n_layer).items():
        if name not in sd:
            continue
        w = sd[name]
        if gname.endswith("attn_qkv.weight") and family.name != "gpt2":
            for part, piece in zip("qkv", w.chunk(3)):
                out[gname.replace("qkv", part)] = piece
        elif gname.endswith("ffn_up.weight") and family.name == "qwen3":
            out[gname.replace("up", "gate")], out[gname] = w.chunk(2)
        else:
            out[gname] = w
    return {k: v.contiguous().numpy() for k, v in out.items()}


def padded(vocab: GGUFVocab, rows: int) -> GGUFVocab:
    """llama.cpp wants one token per embedding row; a model wider than its tokenizer (model.vocab_size set
    above it) gets placeholder tokens of type UNUSED for the rows no text maps to."""
    extra = [f"<|unused{i}|>" for i in range(rows - len(vocab.tokens))]
    return dataclasses.replace(vocab, tokens=vocab.tokens + extra,
                               token_types=vocab.token_types + [int(TokenType.UNUSED)] * len(extra))


def add_architecture(writer, family: Family, cfg) -> None:
    """The hyper-parameters llama.cpp reads for the architecture (one epsilon serves every norm, as in
    tinygpt)."""
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(mlp_hidden(cfg))
    writer.add_head_count(cfg.n_head)
    if family.name == "gpt2":
        writer.add_layer_norm_eps(1e-5)
        return
    writer.add_head_count_kv(cfg.n_head)
    writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(1e-5)
    if family.name == "apertus":
        # llama.cpp's apertus computes xIELU, which these constants make relu(x)^2 exactly: softplus(alpha_p)
        # = 1
        # gives the positive branch x^2 + beta*x with beta 0; alpha_n = -1e4 makes the negative branch's
        # softplus underflow to 0. All four keys are required, one value per layer.
        n = cfg.n_layer
        writer.add_xielu_alpha_p([math.log(math.e - 1)] * n)
        writer.add_xielu_alpha_n([-1e4] * n)
        writer.add_xielu_beta([0.0] * n)
        writer.add_xielu_eps([-1e-6] * n)


def add_tensors(writer, tensors: dict[str, np.ndarray], dtype: str, gguf) -> list[str]:
    """Add the tensors in `dtype`; norms, biases and other 1-D tensors stay float32 (as llama.cpp's own
    converter
    keeps them), and q8_0 needs rows that are a multiple of its 32-value block: other matrices go in as f16.
    Returns the names that fell back."""
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    fell_back = []
    for name, w in tensors.items():
        t = qtype if w.ndim > 1 else gguf.GGMLQuantizationType.F32
        if t == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % 32:
            t = gguf.GGMLQuantizationType.F16
            fell_back.append(name)
        data = gguf.quants.quantize(w, t)
        writer.add_tensor(name, data, raw_dtype=t)  # the writer derives a quantized shape from the bytes
    return fell_back


def export_gguf(ckpt: Checkpoint, out: Path, template: ChatTemplate | None, dtype: str = "f32",
                overwrite: bool = False, log=print) -> Path:
    """Write the GGUF file `out`; nothing is written when the model or its tokenizer has no GGUF form."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    gguf = gguf_module()
    family = family_of(ckpt.config.model, "GGUF")
    # refusals come before any writing
    vocab = padded(gguf_vocab(ckpt.tokenizer), ckpt.config.model.vocab_size)
    tensors = gguf_tensors(ckpt.model, family)
    with staged(out, overwrite, folder=False) as tmp:
        writer = gguf.GGUFWriter(str(tmp), family.gguf_arch)
        writer.add_name(ckpt.home.name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_architecture(writer, family, ckpt.config.model)
        write_vocab(writer, vocab, template.jinja() if template else None)
        fell_back = add_tensors(writer, tensors, dtype, gguf)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if fell_back:
        log(f"gguf: {len(fell_back)} matrices whose rows are not a multiple of 32 values were written as "
            "f16, not q8_0")
    return out
