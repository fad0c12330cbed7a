"""Optimizers: AdamW, or Muon for the blocks' weight matrices with AdamW for everything else."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from tinygpt.config import TrainConfig
from tinygpt.device import cpu_has_native_bf16
from tinygpt.model import GPT

# Coefficients of the quintic Newton-Schulz iteration tuned for Muon (Jordan et al. 2024, "Muon: An
# optimizer for hidden layers in neural networks"): five steps take every singular value into ~[0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T: the update direction with every singular value near 1."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix x x^T is then the small one
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, inside the iteration's basin
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update for each weight matrix is orthogonalised (Newton-Schulz) before it is
    applied.

    torch.optim.Muon exists, but it always iterates in bfloat16, which CPUs without native bf16 emulate
    (2-100x slower than float32 there, by matrix size); this one iterates in bfloat16 only where that is
    fast (CUDA, or a CPU with AVX512-BF16/AMX). The update is scaled by 0.2 * sqrt(max(rows, cols)),
    which gives it the RMS of a typical AdamW update (Liu et al. 2025, "Muon is Scalable for LLM
    Training"), so the same learning rate and schedule drive both optimizers."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.95,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        device = self.param_groups[0]["params"][0].device  # make_optimizer gives it one model's parameters
        ns_dtype = torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                nesterov = p.grad.lerp(buf, group["momentum"])
                update = orthogonalize(nesterov, ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))


class Optimizers:
    """Several optimizers driven as one: the training loop sets lr on param_groups, steps, zeroes,
    and saves or restores the state of all of them together."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # Looked up each time: load_state_dict gives every optimizer new group dicts.
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run uses "
                             f"{sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def adamw(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel exists for CUDA and, since PyTorch 2.4, the CPU: one pass over each tensor instead of
    # foreach's ~8 (measured on 2 CPU cores: 20 ms against 110 ms a step for 30M parameters).
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW | Optimizers:
    """AdamW with weight decay on weight matrices only: decaying norms, biases and embeddings pulls them
    towards zero for no regularisation benefit (the GPT-3 and nanoGPT recipe, minus embeddings).
    With optimizer="muon", the weight matrices inside the blocks go to Muon instead."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    if cfg.optimizer == "adamw":
        return adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}], cfg, device)
    # Muon is for hidden layers: the embedding and output matrices stay with AdamW (Jordan et al. 2024).
    hidden = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    return Optimizers(
        muon=Muon([p for p in decay if id(p) in hidden], lr=cfg.lr, weight_decay=cfg.weight_decay),
        adamw=adamw([{"params": [p for p in decay if id(p) not in hidden], "weight_decay": cfg.weight_decay},
                     {"params": no_decay, "weight_decay": 0.0}], cfg, device))


def members(optimizer: torch.optim.Optimizer | Optimizers) -> list[torch.optim.Optimizer]:
    """The torch optimizers that make up `optimizer` (a GradScaler unscales and steps each on its own)."""
    return list(optimizer.optimizers.values()) if isinstance(optimizer, Optimizers) else [optimizer]
