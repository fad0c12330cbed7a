"""--train.batch_size auto (tinygpt.train.fit): the largest micro-batch that fits, same global batch."""

import json

import pytest
import torch
import yaml

from conftest import tiny_flags
from tinygpt.cli import main
from tinygpt.train import fit


@pytest.mark.parametrize("global_batch,limit,want", [(64, 64, 64), (64, 20, 16), (24, 5, 4), (20, 7, 5),
                                                     (18, 8, 6), (7, 6, 1), (12, 0, None),
                                                     (1, 1, 1), (96, 40, 32)])
def test_the_largest_divisor_that_fits_is_found_by_halving(global_batch, limit, want):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit
    assert fit.largest_that_fits(global_batch, fits) == want
    assert all(global_batch % b == 0 for b in tried)
    assert len(tried) <= 2 * len(bin(global_batch))  # a handful of steps, not one per divisor


def train_auto(out, text_file, tmp_path, *extra):
    """`tinygpt train --train.batch_size auto` on a config file whose global batch is 8 x 2 = 16."""
    cfg_file = tmp_path / "batch.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": {"batch_size": 8, "grad_accum": 2}}))
    flags = [f for f in tiny_flags() if f not in ("--train.batch_size", "4")]
    return main(["train", "--data", str(text_file), "--tokenizer", "char", "--out", str(out), "--config",
                 str(cfg_file), *flags, "--train.batch_size", "auto", *extra])


def test_auto_batch_takes_the_largest_that_fits_and_keeps_the_global_batch(text_file, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setattr(fit, "PROBED", ("cpu",))  # stand in for a GPU
    real_step, tried = fit.try_step, []

    def out_of_memory_above_5(cfg, device, dtype, batch):
        tried.append(batch)
        if batch > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        real_step(cfg, device, dtype, batch)  # a real step at the batch that fits
    monkeypatch.setattr(fit, "try_step", out_of_memory_above_5)
    out = tmp_path / "run"
    assert train_auto(out, text_file, tmp_path) == 0
    assert tried == [16, 8, 4]
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"], saved["auto_batch"]) == (4, 4, False)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["tokens_seen"] == last["step"] * 16 * 16  # 16 windows of 16 tokens a step, as configured
    assert "train.batch_size auto: micro-batch 4 x grad_accum 4 (global batch 16) fits on cpu" in \
        capsys.readouterr().err

    # resuming with the same command keeps the choice, probing nothing
    tried.clear()
    assert train_auto(out, text_file, tmp_path, "--resume", "--train.max_iters", "8") == 0
    assert tried == [] and yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"] == 4


def test_auto_batch_on_a_cpu_keeps_the_configured_batch(text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit, "try_step", lambda *a: pytest.fail("a CPU is not probed"))
    out = tmp_path / "run"
    assert train_auto(out, text_file, tmp_path) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"], saved["auto_batch"]) == (8, 2, False)
    assert "train.batch_size auto: on cpu the configured batch stays (8 x grad_accum 2)" in \
        capsys.readouterr().err


def test_no_batch_fits_is_one_line(text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit, "PROBED", ("cpu",))

    def never_fits(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    monkeypatch.setattr(fit, "try_step", never_fits)
    out = tmp_path / "run"
    assert train_auto(out, text_file, tmp_path) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: out of memory on cpu even with a micro-batch of 1 x context 16")
    assert not out.exists()  # nothing written before the run could start
