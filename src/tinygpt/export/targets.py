"""Which outside architecture a tinygpt model *is*, exactly, so that exporting it changes no logit.

tinygpt's variants are picked by name (ModelConfig), and only some combinations exist elsewhere. Each family
below lists the settings it requires; a model matches the family whose requirements all hold, and every
exporter (Hugging Face, GGUF) starts from that answer. A model that matches none is refused, naming the
settings that keep it from its nearest family, because a "close" architecture gives a silently wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tinygpt.config import ModelConfig
from tinygpt.errors import TinyGPTError


@dataclass(frozen=True)
class Family:
    name: str  # tinygpt's name for it
    hf_class: str  # the transformers class that computes exactly this network
    gguf_arch: str | None  # llama.cpp's architecture name, or None where llama.cpp has none
    requires: dict[str, Any]  # ModelConfig fields that must have these values (bias: see below)


_PRE_LN = dict(norm_placement="pre", head="linear")
FAMILIES = [
    # GPT-2 itself. bias=False also fits: GPT-2 with every bias zero computes the same thing.
    Family("gpt2", "GPT2LMHeadModel", "gpt2",
           dict(_PRE_LN, pos="learned", norm="layernorm", mlp="gelu", qk_norm=False)),
    # Apertus: RoPE (half-split), RMSNorm, per-head QK RMSNorm before RoPE, non-gated MLP with relu2, no bias.
    Family("apertus", "ApertusForCausalLM", "apertus",
           dict(_PRE_LN, pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False)),
    # Qwen3: the same with a SwiGLU MLP (gate, up, down).
    Family("qwen3", "Qwen3ForCausalLM", "qwen3",
           dict(_PRE_LN, pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False)),
    # GPT-1 is post-LN with learned positions; loading tinygpt's fixed sinusoid table into them is exact.
    # Its MLP is always 4x wide and its head always tied.
    Family("openai-gpt", "OpenAIGPTLMHeadModel", None,
           dict(norm_placement="post", head="linear", pos="sinusoidal", norm="layernorm", mlp="relu",
                qk_norm=False, bias=True, tie_weights=True)),
]


def _mismatches(cfg: ModelConfig, family: Family) -> list[str]:
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in family.requires.items() if getattr(cfg, k) != v]
    if family.name == "openai-gpt" and cfg.mlp_hidden not in (None, 4 * cfg.n_embd):
        wrong.append(f"mlp_hidden={cfg.mlp_hidden}")
    return wrong


def family_of(cfg: ModelConfig, runtime: str = "Hugging Face") -> Family:
    """The family whose network equals this one, or a TinyGPTError naming what stands in the way."""
    if cfg.head == "adaptive":
        raise TinyGPTError(f"cannot export to {runtime}: the adaptive softmax head gives log-probabilities "
                           "through clusters of narrower projections, not one linear output layer, and no "
                           "runtime implements it; train with --model.head linear")
    by_distance = sorted(FAMILIES, key=lambda f: len(_mismatches(cfg, f)))
    nearest = by_distance[0]
    wrong = _mismatches(cfg, nearest)
    if not wrong:
        if runtime == "GGUF" and nearest.gguf_arch is None:
            raise TinyGPTError("cannot export to GGUF: llama.cpp has no post-LN architecture "
                               f"({nearest.name}, as in the gpt-lite preset); export it with --format hf "
                               "instead")
        return nearest
    raise TinyGPTError(f"cannot export to {runtime}: no architecture there computes this model exactly; the "
                       f"nearest is {nearest.hf_class} ({nearest.name}), which needs "
                       + ", ".join(f"{k}={v!r}" for k,
                                   v in nearest.requires.items()) + f", not {', '.join(wrong)}")


def with_zero_biases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bias-free model's state dict with a zero bias beside every norm and linear weight: GPT-2's formats
    (transformers' class, llama.cpp's gpt2) require every bias, and zero ones compute the same network."""
    tables = ("wte.weight", "wpe.weight", "lm_head.weight")  # embeddings and the head never have one
    biases = {n[: -len("weight")] + "bias": torch.zeros(w.shape[0]) for n, w in sd.items()
              if n.endswith(".weight") and not n.endswith(tables)}
    return {**biases, **sd}
