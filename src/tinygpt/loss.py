"""The output layer and cross-entropy as one operation, a chunk of rows at a time.

Written plainly, `F.cross_entropy(x @ W.T, targets)` builds the (tokens, vocab) logits, a
log-softmax of the same size, and in backward a gradient of the same size again: 412 MB each for
a batch of 8 x 256 tokens over GPT-2's 50,257 ids. On a 2-core CPU those passes over memory (and
the page faults of allocating them afresh every step) took ~0.7 s of a 3.5 s training step while
the matmuls themselves ran at peak. Here the logits exist one chunk of rows at a time (51 MB for
256 rows of that vocabulary): the chunk's softmax is turned into its gradient in place and
multiplied out at once, so backward only has to scale the gradients forward already made (the
approach of Liger Kernel's fused linear cross-entropy, arXiv:2410.10989). The matmul work is the
same as before.
"""

from __future__ import annotations

import torch

# A chunk's logits take about CHUNK_BYTES, and at least MIN_CHUNK_ROWS rows: fewer rows make the
# weight-gradient update (a pass over the whole (vocab, n_embd) matrix per chunk) cost more than the
# logits save. On the 10M benchmark shape (8 x 256 tokens, GPT-2 vocabulary) 256- and 512-row chunks
# trained equally fast (1.40x and 1.41x the transformers loop, same run). Reusing one buffer for every
# chunk's logits instead of allocating each afresh gave another ~3% (718 vs 698 tok/s, medians of 4 rounds).
CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 256


def chunk_rows(vocab_size: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits x @ weight.T against targets; rows whose target is -1 are skipped.

    x (N, C), weight (V, C), targets (N,). Gradients are computed during forward when with_grad is
    set (it must be False under torch.no_grad, which autograd hides from forward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                with_grad: bool) -> torch.Tensor:
        device = x.device.type
        # Autocast is honoured by hand: the in-place gradient updates below must not be recast.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            w, xs = weight.to(dtype), x.to(dtype)
            want_x = with_grad and ctx.needs_input_grad[0]
            want_w = with_grad and ctx.needs_input_grad[1]
            grad_x = torch.empty_like(x) if want_x else None
            grad_w = torch.zeros_like(weight) if want_w else None
            total = torch.zeros((), device=x.device, dtype=torch.float32)
            step = chunk_rows(weight.size(0))
            # One buffer for every chunk's logits: a fresh 50 MB allocation per chunk costs page faults.
            buf = torch.empty(min(step, x.size(0)), w.size(0), device=x.device, dtype=dtype)
            for start in range(0, x.size(0), step):
                xc, tc = xs[start:start + step], targets[start:start + step]
                logits = torch.mm(xc, w.t(), out=buf[:xc.size(0)]).float()
                keep = (tc >= 0).unsqueeze(1).float()
                picked = tc.clamp(min=0).unsqueeze(1)
                target_logit = logits.gather(1, picked)
                top = logits.amax(1, keepdim=True)
                exps = logits.sub_(top).exp_()  # in place, one exp pass serves both the loss and its gradient
                sums = exps.sum(1, keepdim=True)
                total += ((top + sums.log() - target_logit) * keep).sum()
                if not (want_x or want_w):
                    continue
                # d loss / d logits = softmax - onehot(target), zero on skipped rows.
                grad = exps.div_(sums).scatter_add_(1, picked, -keep).mul_(keep).to(dtype)
                if want_x:
                    grad_x[start:start + step] = grad @ w
                if want_w:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(grad.t(), xc)
                    else:  # bf16 products summed in float32, as autocast's matmuls would
                        grad_w += grad.t() @ xc
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_total,
                None if grad_w is None else grad_w * grad_total, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum(cross_entropy(x @ weight.T, targets)) over the rows whose target is not -1, in float32."""
    return LinearCrossEntropy.apply(x, weight, targets, torch.is_grad_enabled())
