"""The GPT: a decoder-only transformer small enough to read top to bottom.

Parameter names follow GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ...) so
weights map across; with the default ModelConfig the network *is* GPT-2, which
tests/test_model.py checks against Hugging Face's implementation. Variants are
small pieces picked by name from the tables below (NORMS, MLPS, POSITIONS).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.config import ModelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator


# ---------------------------------------------------------------- pieces chosen by name

def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=1e-5)
    return nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)  # GPT-2's epsilon


def mlp_hidden(cfg: ModelConfig) -> int:
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":  # 2/3 of 4x keeps the parameter count of a 4x plain MLP (Shazeer 2020)
        return 32 * math.ceil(8 * cfg.n_embd / 3 / 32)
    return 4 * cfg.n_embd


class MLP(nn.Module):
    """Linear -> activation -> linear. GPT-2 uses the tanh approximation of GELU."""

    def __init__(self, cfg: ModelConfig, act: nn.Module):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, mlp_hidden(cfg), bias=cfg.bias)
        self.act = act
        self.c_proj = nn.Linear(mlp_hidden(cfg), cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), then a projection (Shazeer 2020, used by LLaMA)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 2 * mlp_hidden(cfg), bias=cfg.bias)
        self.c_proj = nn.Linear(mlp_hidden(cfg), cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


MLPS = {
    "gelu": lambda cfg: MLP(cfg, nn.GELU(approximate="tanh")),
    "relu": lambda cfg: MLP(cfg, nn.ReLU()),
    "swiglu": SwiGLU,
}


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position table added to the embeddings (Vaswani et al. 2017); no parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pos = torch.arange(cfg.block_size, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, cfg.n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / cfg.n_embd))
        table = torch.zeros(cfg.block_size, cfg.n_embd)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: cfg.n_embd // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.table[pos]


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotates q and k by position instead of adding a table."""

    def __init__(self, cfg: ModelConfig, base: float = 10000.0):
        super().__init__()
        hs = cfg.n_embd // cfg.n_head
        inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x: (B, H, T, hs)
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ---------------------------------------------------------------- attention and blocks

class KVCache:
    """Preallocated keys and values for all layers, so decoding a token never reallocates."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached; advanced by GPT.hidden after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: Rotary | None, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if rope is not None:
            q, k = rope(q, pos), rope(k, pos)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
        # New queries sit at positions start..start+T-1 and may see every key up to their own position.
        mask = None
        if start > 0 and T > 1:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0 and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)
        self.mlp_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: Rotary | None, cache: KVCache | None) -> torch.Tensor:
        if self.pre_norm:  # GPT-2: normalise each branch's input, keep the residual stream raw
            x = x + self.attn(self.ln_1(x), pos, rope, cache)
            return x + self.mlp_dropout(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.attn(x, pos, rope, cache))  # original Transformer: normalise after the add
        return self.ln_2(x + self.mlp_dropout(self.mlp(x)))


# ---------------------------------------------------------------- the model

class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("ModelConfig.vocab_size must be set (it normally comes from the tokenizer)")
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            # Post-norm blocks already end in a norm; a final one is only needed for pre-norm.
            ln_f=make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity(),
        ))
        if cfg.pos == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos == "sinusoidal":
            self.transformer.wpe = SinusoidalPositions(cfg)
        self.rope = Rotary(cfg) if cfg.pos == "rope" else None
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of layers that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd) for token ids idx (B, T), continuing after `cache` if given."""
        start = cache.pos if cache is not None else 0
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, pos, self.rope, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy where targets are given (-1 = ignore)."""
        logits = self.lm_head(self.hidden(idx, cache))
        loss = None
        if targets is not None:
            # sum / count rather than reduction="mean": a batch whose targets are all masked gives 0, not NaN
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1,
                                   reduction="sum") / (targets >= 0).sum().clamp(min=1)
        return logits, loss

    def new_cache(self, batch_size: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T) and return the whole sequence (nanoGPT's API)."""
        from tinygpt.generate import stream_tokens

        new = list(stream_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, generator=generator))
        return torch.cat([idx, *(t[:, None] for t in new)], dim=1)

    def stream(self, idx: torch.Tensor, *args, **kwargs) -> Iterator[torch.Tensor]:
        from tinygpt.generate import stream_tokens

        return stream_tokens(self, idx, *args, **kwargs)


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
