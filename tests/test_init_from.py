"""--init-from: start a run from a tinygpt run or from a Hugging Face GPT-2 folder written by save_pretrained
(real files: GPT2LMHeadModel and GPT2Model, safetensors and pytorch_model.bin, float32 and bfloat16)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import SHARED_DATA, tiny_flags
from tinygpt import config
from tinygpt import run as tinygpt_run
from tinygpt.cli import main
from tinygpt.errors import UsageError
from tinygpt.init_from import open_source
from tinygpt.model import GPT

transformers = pytest.importorskip("transformers")
GPT2_RANKS = SHARED_DATA / "gpt2.tiktoken"
TEXT = "Hello  world!\n  12345 and café 🙂<|endoftext|> end"
needs_ranks = pytest.mark.skipif(not GPT2_RANKS.exists(), reason=f"{GPT2_RANKS} not found")


def gpt2_tokenizer_files(folder) -> None:
    """GPT-2's tokenizer as transformers itself writes it, converted by transformers from the tiktoken
    ranks."""
    # GPT-2's split pattern (the converter's default is cl100k's)
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers.convert_slow_tokenizer import TikTokenConverter
    backend = TikTokenConverter(vocab_file=str(GPT2_RANKS), pattern=r50k_pat_str,
                                additional_special_tokens=["<|endoftext|>"]).converted()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tok.save_pretrained(folder)


def save_hf_gpt2(folder, cls="GPT2LMHeadModel", dtype=torch.float32, safe=True, vocab_size=50257,
                 **cfg) -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=vocab_size,
                                     **cfg)
    model = getattr(transformers, cls)(hf_cfg).to(dtype)
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms at 0 and 1: perturb them so they count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if safe:
        model.save_pretrained(folder)
    else:  # what older folders hold: a pickle, which must be loaded with weights_only
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


@needs_ranks
@pytest.mark.parametrize("cls, dtype, safe", [("GPT2LMHeadModel", torch.float32, True),
                                              ("GPT2Model", torch.float32, True),
                                              ("GPT2LMHeadModel", torch.bfloat16, True),
                                              ("GPT2LMHeadModel", torch.float32, False)])
def test_hf_gpt2_folder_gives_transformers_logits(tmp_path, cls, dtype, safe):
    folder = tmp_path / "hf"
    save_hf_gpt2(folder, cls, dtype, safe)
    gpt2_tokenizer_files(folder)
    src = open_source(folder, fallback_tokenizer=lambda: pytest.fail("the folder has its own vocabulary"))
    ours = GPT(src.model).eval()
    ours.load_state_dict(src.state)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = src.tokenizer.encode(TEXT, allow_special=True)
    assert hf_tok(TEXT)["input_ids"] == ids and src.tokenizer.eot_id == 50256
    idx = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.2e}"


@needs_ranks
def test_train_from_a_bare_hf_folder(tmp_path, text_file):
    """No vocabulary in the folder: the standard GPT-2 one, from --data.gpt2_ranks (offline)."""
    save_hf_gpt2(tmp_path / "hf")
    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(tmp_path / "hf"), "--data", str(text_file), "--out", str(out),
                 "--data.gpt2_ranks", str(GPT2_RANKS), "--train.max_iters", "2", "--train.batch_size", "2",
                 "--train.eval_iters", "1"]) == 0
    saved = config.from_dict(config.load_yaml(out / "config.yaml"))
    assert (saved.model.n_layer, saved.model.n_embd, saved.model.block_size,
            saved.model.vocab_size) == (2, 32, 64, 50257)
    assert saved.data.tokenizer == "gpt2" and saved.train.init_from == str(tmp_path / "hf")


def test_text_run_then_conversations(tmp_path, text_file, monkeypatch, capsys):
    """Pretrain on text, finetune on conversations: the tokenizer is reused, the chat markers get new rows
    that start at the mean embedding, and every old row starts where the source left it."""
    base = tmp_path / "base"
    assert main(["train", "--data", str(text_file), "--data.vocab_size", "300", "--out", str(base),
                 *tiny_flags()]) == 0
    flags = {"train.init_from": str(base), "train.max_iters": 3, "train.batch_size": 4,
             "train.eval_interval": 3,
             "train.eval_iters": 1}
    with pytest.raises(UsageError, match="model.n_layer cannot be set"):
        config.resolve(None, None, {**flags, "model.n_layer": 3})
    run = tinygpt_run.create(config.resolve(None, None, flags), tmp_path / "ft")
    source = tinygpt_run.load(base, device="cpu")
    new = [t for t in run.data.tokenizer.special_tokens if t not in source.tokenizer.special_tokens]
    assert new == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert run.config.model.n_layer == source.config.model.n_layer == 1  # the architecture is the source's
    assert run.config.model.vocab_size == source.config.model.vocab_size + 4
    old_rows = source.model.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        w = run.source.state[name]
        assert torch.equal(w[:-4], old_rows[name])
        assert torch.allclose(w[-1], old_rows[name].mean(0))
    run.train(log=lambda m: None)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nwhat is 2 plus 3?\n"))
    assert main(["chat", "--run", str(tmp_path / "ft"), "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("change, reason", [
    (dict(model_type="llama"), "holds a llama model"),
    (dict(activation_function="relu"), "activation_function"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    (dict(vocab_size=300), "300 token rows but its tokenizer 50257"),
])
@needs_ranks
def test_incompatible_hf_folders_are_refused(tmp_path, text_file, capsys, change, reason):
    folder = tmp_path / "hf"
    save_hf_gpt2(folder)
    gpt2_tokenizer_files(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UsageError, match=reason):
        open_source(folder, fallback_tokenizer=lambda: None)
    out = tmp_path / "never"
    capsys.readouterr()
    assert main(["train", "--init-from", str(folder), "--data", str(text_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert reason in err and err.count("\n") == 1 and not out.exists()
