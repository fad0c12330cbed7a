"""The GPU check (bench/gpu.py) runs end to end on the CPU (--smoke), and its Shakespeare preset is nanoGPT's
train_shakespeare_char recipe."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tinygpt import config

REPO = Path(__file__).resolve().parents[1]


def test_shakespeare_gpu_preset_is_nanogpts_train_shakespeare_char():
    c = config.resolve("shakespeare-gpu")
    m, t = c.model, c.train
    # nanoGPT's config/train_shakespeare_char.py, and train.py's defaults where that file keeps them
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (6, 6, 384, 256, 0.2, False)
    assert (m.pos, m.norm, m.norm_placement, m.mlp, m.tie_weights, m.head) == (
        "learned", "layernorm", "pre", "gelu", True, "linear")
    assert (c.data.tokenizer, c.data.val_fraction) == ("char", 0.1)
    assert (t.batch_size, t.grad_accum, t.max_iters, t.lr, t.min_lr, t.lr_decay_iters, t.warmup_iters) == (
        64, 1, 5000, 1e-3, 1e-4, 5000, 100)
    assert (t.schedule, t.optimizer, t.beta1, t.beta2, t.weight_decay, t.grad_clip) == (
        "cosine", "adamw", 0.9, 0.99, 0.1, 1.0)
    assert (t.eval_interval, t.eval_iters, t.epochs, t.time_budget) == (250, 200, None, None)
    description = config.PRESETS["shakespeare-gpu"].description
    assert "nanoGPT's train_shakespeare_char" in description and "GPU" in description


def finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_gpu_check_smoke_run_measures_every_section(tmp_path):
    out = tmp_path / "results-gpu.json"
    # about 30 s on 2 CPU cores; the timeout only guards against a hang
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "total wall time" in proc.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and report["device"] == "cpu"
    s = report["sections"]
    assert not [name for name, r in s.items() if "error" in r], json.dumps(s, indent=1)[-3000:]
    speed = s["124m"]
    assert finite(speed["tinygpt"]["tok_s"], speed["transformers"]["tok_s"], speed["ratio"])
    assert speed["tinygpt"]["mfu"] is None  # no peak FLOPs for a CPU, so no MFU
    fp16 = s["fp16"]
    assert fp16["all_finite"]
    assert finite(fp16["max_abs_diff"], *fp16["fp16_losses"], *fp16["reference_losses"])
    assert len(fp16["fp16_losses"]) == fp16["steps"] and fp16["skipped_steps"] >= 0
    assert fp16["goal_met"]  # a few steps of a tiny model agree far inside the tolerance
    ours = s["shakespeare"]
    assert finite(ours["val_loss"], ours["wall_s"]) and ours["steps"] == 20
    assert ours["goal_met"] is None  # a shortened run is not judged against the recipe's goal
    theirs = s["nanogpt"]
    if "skipped" in theirs:
        assert "git clone https://github.com/karpathy/nanoGPT bench/.cache/nanoGPT" in theirs["skipped"]
    else:
        assert finite(theirs["val_loss"], theirs["wall_s"]) and theirs["steps"] == 20
        # the same 20 steps of the same tiny model on the same split: both near ln(65) - a little
        assert abs(theirs["val_loss"] - ours["val_loss"]) < 0.5


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--out", str(tmp_path / "r.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.fixture
def gpu_bench(monkeypatch):
    """bench/gpu.py as a module (the benchmarks import their siblings by name, from bench/)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu

    return gpu


def test_nanogpt_row_is_skipped_with_the_clone_command_when_its_source_is_absent(gpu_bench, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(gpu_bench, "NANOGPT", tmp_path / "nanoGPT")
    row = gpu_bench.section_nanogpt(None)
    assert row["skipped"].endswith("get it with `git clone https://github.com/karpathy/nanoGPT "
                                   "bench/.cache/nanoGPT`")


def test_nanogpt_data_files_are_what_its_prepare_script_writes(gpu_bench, tmp_path):
    import array
    import pickle

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    facts = gpu_bench.write_char_dataset(tmp_path / "input.txt", tmp_path / "out")
    meta = pickle.loads((tmp_path / "out" / "meta.pkl").read_bytes())
    chars = sorted(set(text))
    assert meta == {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                    "stoi": {c: i for i, c in enumerate(chars)}}
    n = int(len(text) * 0.9)  # nanoGPT's split: the first 90% of the characters train
    for name, part in (("train.bin", text[:n]), ("val.bin", text[n:])):
        ids = array.array("H")
        ids.frombytes((tmp_path / "out" / name).read_bytes())  # uint16, as nanoGPT's np.memmap reads them
        assert "".join(meta["itos"][i] for i in ids) == part
    assert facts == {"vocab_size": len(chars), "train_tokens": n, "val_tokens": len(text) - n}
