"""Starting a run from existing weights (`tinygpt train --init-from SOURCE`) instead of a random init.

SOURCE is a tinygpt run (or one of its checkpoint folders), e.g. a model pretrained on text to finetune on
conversations, or a local Hugging Face GPT-2 folder as `save_pretrained` writes it (GPT2LMHeadModel or
GPT2Model; safetensors, sharded or not, or pytorch_model.bin). The architecture and the tokenizer come from
the source; the new run's data may add special tokens (a chat template's markers), which get new rows in the
embedding and output layers. Nothing here unpickles: .bin files load with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tinygpt import checkpoint, rundir
from tinygpt.config import ModelConfig
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.presets import GPT2_ARCH
from tinygpt.tokenizer import EOT, GPT2Tokenizer, Tokenizer, ranks_from_vocab

# Hugging Face's GPT-2 stores these as Conv1D, whose weight is the transpose of nn.Linear's; every other
# name is tinygpt's own (tinygpt keeps GPT-2's parameter names).
GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class Source:
    """What a run starts from: the architecture, the tokenizer and the weights (tinygpt names, float32,
    CPU)."""

    description: str
    model: ModelConfig
    tokenizer: Tokenizer
    state: dict[str, torch.Tensor]


def gpt2_state_from_hf(hf_state: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """A Hugging Face GPT-2 state dict (GPT2LMHeadModel's `transformer.*` names, or GPT2Model's unprefixed
    ones) in tinygpt's names and layout. save_pretrained leaves out the tied lm_head.weight: it is the
    token embedding, so it is filled in from there."""
    state = {}
    for name, tensor in hf_state.items():
        # causal-mask buffers in older files, not weights
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        tensor = tensor.float()  # fp16/bf16 files: tinygpt trains in float32 (autocast does the rest)
        state[name] = tensor.t().contiguous() if name.endswith(GPT2_TRANSPOSED) else tensor
    if tied or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _hf_refusal(folder: Path, why: str) -> TinyGPTError:
    return UsageError(f"cannot start from {folder}: {why}")


def hf_gpt2_model_config(folder: Path, hf: dict[str, Any]) -> ModelConfig:
    """The tinygpt ModelConfig that computes what a Hugging Face GPT2Config describes, or a refusal naming
    the setting tinygpt's GPT-2 does not have."""
    kind = hf.get("model_type")
    if kind != "gpt2":
        raise _hf_refusal(folder, f"it holds a {kind or 'unknown'} model; --init-from reads tinygpt runs and "
                                  "Hugging Face GPT-2 folders")
    checks = [("activation_function", hf.get("activation_function",
                                             "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
               "tinygpt's GELU is the tanh approximation (gelu_new)"),
              ("layer_norm_epsilon", hf.get("layer_norm_epsilon", 1e-5) == 1e-5,
               "tinygpt's LayerNorm uses 1e-5"),
              ("scale_attn_weights", hf.get("scale_attn_weights", True),
               "tinygpt scales attention by 1/sqrt(head size)"),
              ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False),
               "tinygpt does not scale attention by layer")]
    for key, ok, why in checks:
        if not ok:
            raise _hf_refusal(folder, f"its {key} is {hf.get(key)!r} and {why}")
    n_embd, n_head = int(hf.get("n_embd", 768)), int(hf.get("n_head", 12))
    arch = dict(GPT2_ARCH, tie_weights=bool(hf.get("tie_word_embeddings", True)))
    return ModelConfig(**arch, n_layer=int(hf.get("n_layer", 12)), n_head=n_head, n_embd=n_embd,
                       block_size=int(hf.get("n_positions", 1024)),
                       vocab_size=int(hf.get("vocab_size", 50257)),
                       mlp_hidden=hf.get("n_inner"))


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder: model.safetensors, its shards, or pytorch_model.bin."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise _hf_refusal(folder,
                      "it has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def hf_gpt2_tokenizer(folder: Path, fallback: Callable[[], Tokenizer]) -> Tokenizer:
    """The folder's own GPT-2 vocabulary (vocab.json, or the one inside tokenizer.json) as a tinygpt gpt2
    tokenizer, offline; a folder without one (a bare save_pretrained of the model) gets `fallback()`.
    GPT-2's vocabulary ids are its BPE ranks, and merges follow rank order, so the ids alone rebuild it."""
    fix = "--init-from reads GPT-2 byte-level BPE vocabularies"
    if (folder / "vocab.json").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    elif (folder / "tokenizer.json").is_file():
        vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    else:
        return fallback()
    eot = vocab.pop(EOT, None)
    ranks = ranks_from_vocab(vocab, fix)
    if sorted(ranks.values()) != list(range(len(ranks))) or eot not in (None, len(ranks)):
        raise _hf_refusal(folder,
                          f"its vocabulary ids are not GPT-2's layout (ranks 0..N-1, then {EOT}); {fix}")
    return GPT2Tokenizer(ranks, [])


def from_hf_folder(folder: Path, fallback_tokenizer: Callable[[], Tokenizer]) -> Source:
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _hf_refusal(folder, f"its config.json cannot be read ({e})") from None
    cfg = hf_gpt2_model_config(folder, hf)
    tok = hf_gpt2_tokenizer(folder, fallback_tokenizer)
    if cfg.vocab_size < tok.vocab_size:
        raise _hf_refusal(folder,
                          f"its model has {cfg.vocab_size} token rows but its tokenizer {tok.vocab_size} ids")
    state = gpt2_state_from_hf(hf_weights(folder), cfg.tie_weights)
    return Source(f"Hugging Face GPT-2 folder {folder}", cfg, tok, state)


def from_run(path: Path) -> Source:
    ckpt_dir = checkpoint.locate(path, "last")
    ckpt = checkpoint.load(ckpt_dir, "cpu", verified=True)
    return Source(f"{ckpt_dir} (step {ckpt.step})", ckpt.config.model, ckpt.tokenizer,
                  ckpt.model.state_dict())


def open_source(path: str | Path, fallback_tokenizer: Callable[[], Tokenizer]) -> Source:
    """The weights a new run starts from: a tinygpt run or checkpoint folder, or a Hugging Face GPT-2
    folder."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"cannot start from {path}: no such folder (give a tinygpt run directory or a "
                         "Hugging Face GPT-2 folder)")
    if (path / "config.json").is_file() and not (path / rundir.CONFIG).is_file():
        return from_hf_folder(path, fallback_tokenizer)
    return from_run(path)


def grow_vocab(src: Source, tokenizer: Tokenizer) -> Source:
    """The source with rows for the token ids `tokenizer` adds past the model's vocabulary (new special
    tokens).
    Each new row starts at the mean of the existing rows (Hewitt 2021): a random row can get a large logit
    everywhere and disturb the pretrained distribution; the mean starts the new token as an average one."""
    old = src.model.vocab_size
    new = max(old, tokenizer.vocab_size)
    if new == old:
        return replace(src, tokenizer=tokenizer)
    if src.model.head == "adaptive":
        raise UsageError(f"cannot add {new - old} token(s) to {src.description}: its adaptive softmax head "
                         "has clusters of fixed size; start from a run whose tokenizer already has them")
    state = dict(src.state)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        w = state[name]
        state[name] = torch.cat([w, w.mean(0, keepdim=True).expand(new - old, -1)])
    if src.model.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return replace(src, model=replace(src.model, vocab_size=new), tokenizer=tokenizer, state=state)
