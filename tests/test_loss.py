import pytest
import torch
import torch.nn.functional as F

from tinygpt import loss as fused


def plain(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=-1, reduction="sum")


def leaves(n, c, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).requires_grad_()
    w = (torch.randn(v, c, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -1  # skipped rows must give neither loss nor gradient
    return x, w, t


@pytest.mark.parametrize("rows", [7, 1000])  # many chunks (with a ragged last one), and a single chunk
def test_fused_loss_and_gradients_match_plain_cross_entropy(monkeypatch, rows):
    monkeypatch.setattr(fused, "chunk_rows", lambda vocab: rows)
    x, w, t = leaves(40, 16, 300)
    expected = plain(x, w, t)
    gx, gw = torch.autograd.grad(expected * 3.0, (x, w))
    got = fused.linear_cross_entropy(x, w, t)
    fx, fw = torch.autograd.grad(got * 3.0, (x, w))  # the upstream gradient (3) must scale both
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(fx, gx, atol=1e-5) and torch.allclose(fw, gw, atol=1e-5)
    assert fx[::5].abs().max() == 0  # the skipped rows


def test_fused_loss_without_grad_and_with_every_row_skipped():
    x, w, t = leaves(12, 8, 50)
    with torch.no_grad():
        assert torch.allclose(fused.linear_cross_entropy(x, w, t), plain(x, w, t), rtol=1e-5)
    assert fused.linear_cross_entropy(x, w, torch.full_like(t, -1)).item() == 0.0


def test_fused_loss_under_bf16_autocast_stays_close_and_keeps_float32_gradients():
    x, w, t = leaves(32, 16, 100)
    expected = plain(x, w, t)
    gx, gw = torch.autograd.grad(expected, (x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.linear_cross_entropy(x, w, t)
    fx, fw = torch.autograd.grad(got, (x, w))
    assert got.dtype == fx.dtype == fw.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=2e-2)
    assert torch.allclose(fw, gw, atol=0.05 * gw.abs().max().item())


def test_a_gpt2_vocabulary_batch_is_split_and_a_char_one_is_not():
    # the benchmark's batch: at most a quarter of its logits at once
    assert fused.chunk_rows(50257) <= 8 * 256 // 4
    assert fused.chunk_rows(65) > 10_000
