"""Hugging Face transformers: GPT-2 weights into a tinygpt GPT.

With the GPT-2 architecture settings (the default ModelConfig) a tinygpt GPT is GPT-2, with the same
parameter names, so a GPT2LMHeadModel state dict loads after one change of layout.
"""

from __future__ import annotations

import torch

from tinygpt.model import GPT


def load_hf_gpt2_state_dict(model: GPT, hf_state: dict[str, torch.Tensor]) -> None:
    """Load a Hugging Face GPT2LMHeadModel state dict. HF stores its linear layers as Conv1D,
    whose weights are the transpose of nn.Linear's; the names are otherwise the same."""
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = model.state_dict()
    converted = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if name not in ours:
            raise KeyError(f"unexpected key in GPT-2 state dict: {name}")
        converted[name] = tensor.t() if name.endswith(transposed) else tensor
    model.load_state_dict(converted, strict=True)
