"""Kernel selection (tinygpt.infer.kernels): the race every probe runs, the int8 kernels, the probes."""

import pytest
import torch

from tinygpt.infer import kernels
from tinygpt.infer.kernels import KERNELS, Int8Linear, fastest, int8_kernel_works, int8_rows


def skip_unless_working(kernel: str) -> None:
    if not int8_kernel_works(kernel):
        pytest.skip(f"the {kernel} kernel does not run here (the check leaves it out, so no layer takes it)")


def test_the_race_times_only_candidates_that_pass_and_puts_the_fastest_first(monkeypatch):
    timed = []

    def check(name: str) -> bool:
        if name == "missing":
            raise NotImplementedError("an op this build lacks")
        return name != "wrong"

    def run(name: str):
        timed.append(name)
        return lambda: None

    seconds = {"slow": 3.0, "fast": 1.0, "tied": 1.0}
    monkeypatch.setattr(kernels, "fastest_seconds", lambda fn, calls, repeats: seconds[timed[-1]])
    race = fastest(("slow", "missing", "fast", "wrong", "tied"), check, run)
    assert list(race) == ["fast", "tied", "slow"]  # a tie keeps the order
    assert timed == ["slow", "fast", "tied"]
    assert list(fastest(("slow", "fast"), check, run, handicap={"slow": 0.3})) == ["slow", "fast"]
    timed.clear()
    assert fastest(("wrong", "fast"), check, run) == {"fast": 0.0} and not timed  # nothing to choose between
    assert fastest(("wrong", "missing"), check, run) == {}


def test_nothing_is_probed_at_import():
    import subprocess
    import sys

    # Each probe (and the CPU's flags, which the int8 kernels read) is cached once it has run.
    code = ("import tinygpt.cli, tinygpt.serve.app, tinygpt.device as d, tinygpt.infer.kernels as k; "
            "print(sum(f.cache_info().currsize for f in (d.cpu_flags, k.onednn_wins, k.fastest_kernel, "
            "k.int8_kernel_works, k.int8_speedup)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "0\n"


def test_streamed_copies_exceed_the_cache_in_separate_memory():
    t = torch.randn(512, 256)
    copies = kernels.streamed_copies(t)
    assert sum(c.numel() * c.element_size() for c in copies) >= kernels.STREAMED_BYTES
    assert len({c.data_ptr() for c in copies}) == len(copies) and all(torch.equal(c, t) for c in copies)
    assert len(kernels.streamed_copies(torch.zeros(kernels.STREAMED_BYTES, dtype=torch.int8))) == 1


def test_int8_rows_round_trip_within_half_a_step():
    w = torch.randn(16, 40)
    q, scales = int8_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kernel", KERNELS[:-1])
def test_the_int8_kernels_agree_with_the_widened_product(kernel):
    skip_unless_working(kernel)
    layer = Int8Linear(torch.randn(48, 64), torch.randn(48))
    x = torch.randn(3, 5, 64)
    outs = {}
    for k in (kernel, "widen"):
        layer.kernel = k
        outs[k] = layer(x)
    error = ((outs[kernel] - outs["widen"]).abs().max() / outs["widen"].abs().max()).item()
    assert outs[kernel].shape == (3, 5, 48) and error < 0.02


def test_fbgemm_with_7_bit_activations_passes_the_check(monkeypatch):
    # Without VNNI fbgemm rounds activations to 7 bits, on any CPU; the check must take it there.
    # (8 bits without VNNI overflow fbgemm's 16-bit pair sums: the check rightly refuses that.)
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no fbgemm engine")
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(64, 64, generator=g), torch.randn(2, 64, generator=g), torch.randn(64, generator=g)
    q, s = int8_rows(w)
    want = x @ (q.float() * s[:, None]).T + b
    assert kernels.agrees(kernels.kernel_call("fbgemm", q, s, b)(x), want)
    assert not kernels.agrees(kernels.kernel_call("fbgemm", q, s * 1.1, b)(x), want)  # a wrong scale


def test_each_layer_takes_the_probes_fastest_kernel_for_its_size(monkeypatch):
    assert int8_kernel_works(kernels.fastest_kernel(True))  # the real probe, timed here
    monkeypatch.setattr(kernels, "fastest_kernel", lambda large: "fbgemm" if large else "int8pack")
    big, small, odd = (Int8Linear(torch.randn(*shape), None) for shape in ((2048, 1024), (64, 64), (64, 40)))
    assert big.choose(torch.zeros(1, 1024)) == "fbgemm" and small.choose(torch.zeros(1, 64)) == "int8pack"
    assert odd.choose(torch.zeros(1, 40)) == "widen"  # int8pack crashes on such widths


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_gets_the_same_product_alone_and_among_any_rows(kernel):
    # A served request's tokens must not depend on who shares its batch (issue #25): fbgemm used to round
    # all rows of a call with one activation scale, so a small row beside a large one lost its precision.
    skip_unless_working(kernel)
    layer = Int8Linear(torch.randn(96, 64), torch.randn(96))
    layer.kernel = kernel
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=g) * torch.logspace(-3, 3, 40)[:, None]  # magnitudes 1e-3 .. 1e3
    batch = layer(x)
    for i in (0, 20, 39):  # widen's float sums may run in another order for one row: equal to rounding
        assert ((layer(x[i:i + 1])[0] - batch[i]).abs().max() <= 1e-6 * batch[i].abs().max())
    if kernel == "fbgemm":  # its own rounding is per row now: the very same bits
        assert all(torch.equal(layer(x[i:i + 1])[0], batch[i]) for i in range(40))
    want = x @ (layer.weight.float() * layer.scales[:, None]).T + layer.bias
    assert ((batch - want).abs().amax(1) <= 0.02 * want.abs().amax(1)).all()  # each row to its own scale
