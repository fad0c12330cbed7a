"""The GPT: a decoder-only transformer small enough to read top to bottom.

Parameter names follow GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ...) so
weights map across; with the default ModelConfig the network *is* GPT-2, which
tests/test_model.py checks against Hugging Face's implementation. Variants are
small pieces picked by name (make_norm, the MLPS and ATTENTION tables, the position
and head modules).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinygpt.config import ModelConfig
from tinygpt.loss import linear_cross_entropy

# ---------------------------------------------------------------- pieces chosen by name

class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in float32 and returned in its input's dtype. Under bf16 autocast the input can be
    bf16 (the QK-norm's queries and keys come straight from a linear layer) while the weight is float32;
    torch then falls back to exactly this computation, but warns on every call ("Mismatch dtype between
    input and weight"). Doing it explicitly gives the same values (checked bit for bit) without the warning;
    the weight is made float32 too, for a model whose weights were made bf16 for decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 weights (a model decoding in bf16)
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=1e-5)
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


class SquaredReLU(nn.Module):
    """relu(x)^2: the activation found by Primer's search (So et al. 2021), cheap and sparse like ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


MLPS = {
    "gelu": lambda cfg: MLP(cfg, nn.GELU(approximate="tanh")),
    "relu": lambda cfg: MLP(cfg, nn.ReLU()),
    "relu2": lambda cfg: MLP(cfg, SquaredReLU()),
    "swiglu": SwiGLU,
}


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position table added to the embeddings (Vaswani et al. 2017); no parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pos = torch.arange(cfg.block_size, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, cfg.n_embd, 2,
                                      dtype=torch.float32) * (-math.log(10000.0) / cfg.n_embd))
        table = torch.zeros(cfg.block_size, cfg.n_embd)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: cfg.n_embd // 2])
        # Unscaled, the table's entries (RMS 0.7) drown token embeddings initialised at std 0.02 and the
        # model barely learns (val loss stuck at the unigram level on Tiny Shakespeare). Vaswani et al.
        # scale the embeddings up by sqrt(n_embd); scaling the table down by the same factor keeps
        # GPT-2's init and gives the same balance.
        self.register_buffer("table", table / math.sqrt(cfg.n_embd), persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.table[pos]


ROPE_BASE = 10000.0  # RoFormer's base, as GPT-NeoX and LLaMA use; the exporters write it out


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotates q and k by position instead of adding a table."""

    def __init__(self, cfg: ModelConfig, base: float = ROPE_BASE):
        super().__init__()
        hs = cfg.n_embd // cfg.n_head
        inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    # x: (B, H, T, hs); pos: (T,) or (B, T)
    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        if pos.dim() == 2:  # per-sequence positions: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ---------------------------------------------------------------- attention and blocks

def causal_positions(start: int, T: int, block: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of T new tokens after `start` cached ones, and their mask: new queries see every cached key
    and
    the causal part of the new ones. None where no mask is needed (a fresh sequence, or a single new
    query)."""
    if start + T > block:
        raise ValueError(f"sequence of {start + T} tokens exceeds block_size {block}")
    pos = torch.arange(start, start + T, device=device)
    if start > 0 and T > 1:
        return pos, torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
    return pos, None


class Cache(Protocol):
    """What GPT.hidden asks of a KV cache: any object with these methods will do (tinygpt.infer.cache has the
    kinds decoding uses; the model never creates one). Each forward calls positions once, update once per
    layer, then advance."""

    def positions(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions of T new tokens ((T,), or (B, T) per row) and the keys they may see (None: causal)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's keys and values of the new tokens; return that layer's keys and values so far."""

    def advance(self, T: int) -> None:
        """T new tokens went through every layer."""


# Both attention functions take q (B, H, T, hs) for new tokens and k, v (B, H, S, hs) for every position
# so far, and a `visible` mask: None for plain causal attention over a fresh sequence (S == T), else a
# boolean (T, S) or (B, 1, T, S) mask of the keys each query may see (GPT.segment_mask, Cache.positions).
# They return the output (B, H, T, hs) and the attention weights (B, H, T, S), or None for SDPA.

def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                   dropout_p: float) -> tuple[torch.Tensor, None]:
    """PyTorch's fused kernel (flash / memory-efficient attention where available); never builds the
    weights."""
    causal = visible is None and q.size(2) > 1  # a single new query sees every key: no mask at all
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=causal,
                                          dropout_p=dropout_p), None


def einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                     dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation written out, softmax(q k^T / sqrt(hs)) v, so the weights can be returned."""
    T, S = q.size(2), k.size(2)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.size(-1))
    if visible is None:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    y = torch.einsum("bhts,bhsd->bhtd", F.dropout(weights, dropout_p), v)
    return y, weights.detach()  # the weights before dropout, for reading only


ATTENTION = {"sdpa": sdpa_attention, "einsum": einsum_attention}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        # QK-norm (OLMo-2, Gemma): RMS-normalising each head's queries and keys bounds the attention
        # logits, which keeps training stable at higher learning rates.
        head_size = cfg.n_embd // cfg.n_head
        self.q_norm = RMSNorm(head_size, eps=1e-5) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_size, eps=1e-5) if cfg.qk_norm else nn.Identity()
        self.attend = ATTENTION[cfg.attn]
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # Every forward with attn="einsum" leaves its weights (B, H, T, start+T) here; GPT.attention_weights
        # reads them.
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: Rotary | None, cache: Cache | None,
                visible: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q, pos), rope(k, pos)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y, self.last_weights = self.attend(q, k, v, visible, self.dropout if self.training else 0.0)
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

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: Rotary | None, cache: Cache | None,
                visible: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:  # GPT-2: normalise each branch's input, keep the residual stream raw
            x = x + self.attn(self.ln_1(x), pos, rope, cache, visible)
            return x + self.mlp_dropout(self.mlp(self.ln_2(x)))
        # original Transformer: normalise after the add
        x = self.ln_1(x + self.attn(x, pos, rope, cache, visible))
        return self.ln_2(x + self.mlp_dropout(self.mlp(x)))


# ---------------------------------------------------------------- the output head

def adaptive_cutoffs(cfg: ModelConfig) -> list[int]:
    """Cluster boundaries for the adaptive softmax. The shortlist is the ids below the first cutoff, so it
    pays off when frequent tokens have small ids, as in BPE vocabularies (early merges are frequent pairs);
    the char tokenizer orders its ids by code point instead."""
    V = cfg.vocab_size
    if cfg.adaptive_cutoffs == "auto":  # a shortlist of ~V/16 frequent tokens, then clusters up to V/4 and V
        cutoffs = sorted({c for c in (V // 16, V // 4) if 0 < c < V})
        if not cutoffs:
            raise ValueError(f"vocab_size {V} is too small for an adaptive softmax: use head=linear")
    else:
        cutoffs = [int(c) for c in cfg.adaptive_cutoffs.split(",")]
    if not cutoffs or cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] >= V:
        raise ValueError(f"adaptive_cutoffs {cfg.adaptive_cutoffs!r} must be increasing ids in 1..{V - 1}")
    # Each cluster projects down by another factor of div_value (4); past n_embd's size nothing is left.
    if cfg.n_embd // 4 ** len(cutoffs) == 0:
        raise ValueError(f"n_embd {cfg.n_embd} is too small for {len(cutoffs)} adaptive softmax clusters")
    return cutoffs


class AdaptiveHead(nn.AdaptiveLogSoftmaxWithLoss):
    """Adaptive softmax (Grave et al. 2017): frequent tokens get a full softmax, rarer ones sit in clusters
    behind narrower projections. Runs in the weights' precision outside autocast, because the torch module
    writes each cluster's log-probs into a buffer of the input's dtype (and log-probs want float32 anyway)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.n_embd, cfg.vocab_size, adaptive_cutoffs(cfg), div_value=4.0)

    def forward(self, x: torch.Tensor, targets: torch.Tensor):  # x (N, n_embd), targets (N,)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.head.weight.dtype), targets)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # x (..., n_embd) -> (..., vocab_size)
        with torch.autocast(x.device.type, enabled=False):
            flat = super().log_prob(x.reshape(-1, x.size(-1)).to(self.head.weight.dtype))
        return flat.view(*x.shape[:-1], -1)


# ---------------------------------------------------------------- the model

class GPT(nn.Module):
    # Recompute each block's activations in the backward pass instead of storing them (Chen et al. 2016):
    # less memory for ~30% more compute. Set by the trainer; only used while training without a cache.
    activation_checkpointing = False

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
        if cfg.head == "adaptive":  # its output matrix is split into clusters, so tie_weights is ignored
            self.adaptive_head = AdaptiveHead(cfg)
        else:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            if cfg.tie_weights:
                self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # The projections that write into the residual stream: GPT-2 scales their init by 1/sqrt(2 * n_layer)
        # so the stream's variance does not grow with depth; zero_init_proj zeroes them instead, so every
        # block starts as the identity (modded-nanoGPT).
        for p in (p for name, p in self.named_parameters() if name.endswith("c_proj.weight")):
            if cfg.zero_init_proj:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward and backward): 6 per weight plus attention's 12 * layers *
        width * context (the PaLM paper's appendix B estimate), for model-FLOPs utilisation."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    @staticmethod
    def segment_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and visibility for packed conversations: segments (B, T) numbers them within each row. A
        token sees only earlier tokens of its own segment and positions restart at each segment, so a packed
        conversation is processed exactly as it would be alone (which is how chat sees it)."""
        T = segments.size(1)
        pos = torch.arange(T, device=segments.device)
        same = segments[:, :, None] == segments[:, None, :]
        first = torch.cat([torch.ones_like(segments[:, :1], dtype=torch.bool),
                           segments[:, 1:] != segments[:, :-1]], 1)
        seg_start = torch.where(first, pos, 0).cummax(dim=1).values
        return pos - seg_start, (same & torch.ones(T, T, dtype=torch.bool,
                                                   device=segments.device).tril())[:, None]

    def hidden(self, idx: torch.Tensor, cache: Cache | None = None,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, n_embd) for token ids idx (B, T), continuing after `cache` if given;
        segments (B, T) keeps packed sequences apart (see segment_mask)."""
        if cache is not None:
            pos, visible = cache.positions(idx.size(1), idx.device)
        elif segments is not None:
            pos, visible = self.segment_mask(segments)
        else:
            pos, visible = causal_positions(0, idx.size(1), self.config.block_size, idx.device)
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        recompute = self.activation_checkpointing and self.training and cache is None
        for block in self.transformer.h:
            if recompute:  # non-reentrant checkpointing replays the RNG state, so dropout masks match
                x = checkpoint(block, x, pos, self.rope, None, visible, use_reentrant=False)
            else:
                x = block(x, pos, self.rope, cache, visible)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.transformer.ln_f(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary for hidden states x (..., n_embd). The adaptive head gives
        log-probabilities, which work as logits: their softmax is the distribution itself."""
        if self.config.head == "adaptive":
            return self.adaptive_head.log_prob(x)
        return self.lm_head(x)

    def next_logits(self, idx: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Scores (B, vocab_size) for the token after idx (B, T): all that decoding needs."""
        return self.logits(self.hidden(idx, cache)[:, -1])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy where targets are given (-1 = ignore).
        With targets, logits is None: the loss is computed without building them (tinygpt.loss)."""
        x = self.hidden(idx, cache, segments)
        if targets is None:
            return self.logits(x), None
        keep = targets >= 0
        # sum / count, not a mean: a batch with every target masked gives 0, not NaN
        count = keep.sum().clamp(min=1)
        if self.config.head == "adaptive":  # it has no ignore_index: score only the kept positions
            return None, -self.adaptive_head(x[keep], targets[keep]).output.sum() / count
        if type(self.lm_head) is not nn.Linear:  # an output layer swapped for decoding (int8): plain logits
            logits = self.lm_head(x).float().flatten(0, -2)
            return None, F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1,
                                         reduction="sum") / count
        # The fused loss never builds the (B, T, vocab) logits: with targets, forward gives the loss alone.
        return None, linear_cross_entropy(x.flatten(0, -2), self.lm_head.weight, targets.reshape(-1)) / count

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's attention weights (B, n_head, T, T) for idx (B, T): row t is how query t spreads
        over keys 0..t (before attention dropout; call .eval() first to switch the other dropouts off).
        Needs attn="einsum", since the fused kernel never builds them; the parameters are the same, so a
        trained sdpa model's state dict loads into an einsum one."""
        if self.config.attn != "einsum":
            raise ValueError('attention weights need ModelConfig.attn="einsum"')
        self.hidden(idx)
        return [block.attn.last_weights for block in self.transformer.h]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
