import json
import time

import pytest
import torch
from safetensors.torch import load_file

from tinygpt import checkpoint, config
from tinygpt.data import prepare
from tinygpt.errors import TinyGPTError
from tinygpt.model import GPT
from tinygpt.train.loop import Trainer, train
from tinygpt.train.optim import make_optimizer
from tinygpt.train.schedule import lr_at, planned_steps
from tinygpt.train.step import MaybeCompiled


def tiny_config(**train_overrides):
    return config.resolve(flags={
        "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
        "train.batch_size": 4, "train.max_iters": 8, "train.eval_interval": 4, "train.eval_iters": 2,
        "train.checkpoint_interval": 4, "train.warmup_iters": 2,
        **{f"train.{k}": v for k, v in train_overrides.items()}})


def prepared(text_file, cfg, run_dir):
    ds = prepare.prepare_text(cfg.data, text_file, log=lambda m: None)
    cfg.model.vocab_size = ds.tokenizer.vocab_size
    return prepare.copy_to(ds, run_dir / "data")


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_schedule_warms_up_then_decays_to_min_lr():
    t = config.TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10)
    assert lr_at(0, t, 110) < lr_at(5, t, 110) < lr_at(9, t, 110) <= 1.0
    assert lr_at(10, t, 110) == pytest.approx(1.0)
    assert lr_at(60, t, 110) == pytest.approx(0.55)
    assert lr_at(110, t, 110) == pytest.approx(0.1) and lr_at(500, t, 110) == pytest.approx(0.1)
    wsd = config.TrainConfig(lr=1.0, min_lr=0.0, warmup_iters=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(10, wsd, 100) == lr_at(80, wsd, 100) == 1.0  # stable until the last 20%
    assert lr_at(90, wsd, 100) == pytest.approx(0.5) and lr_at(100, wsd, 100) == 0.0


def test_epochs_and_time_budget_set_the_length(text_file, tmp_path):
    assert planned_steps(config.TrainConfig(epochs=2.5, batch_size=4, grad_accum=2),
                         windows_per_epoch=100) == 32
    cfg = tiny_config(time_budget=3.0, max_iters=10**6, eval_interval=20)
    start = time.perf_counter()
    final = train(cfg, tmp_path, prepared(text_file, cfg, tmp_path), log=lambda m: None)
    assert 1 <= final["step"] < 10**6 and time.perf_counter() - start < 30
    # stops when the budget is spent, not at max_iters
    assert final["elapsed_s"] == pytest.approx(3.0, abs=1.5)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = GPT(config.ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    decay, no_decay = make_optimizer(model, config.TrainConfig(), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}
    assert no_decay["weight_decay"] == 0.0 and "transformer.wte.weight" in {names[id(p)]
                                                                            for p in no_decay["params"]}


def test_training_lowers_the_loss_and_records_metrics(text_file, tmp_path):
    cfg = tiny_config(max_iters=40, eval_interval=20, lr=1e-2)
    ds = prepared(text_file, cfg, tmp_path)
    final = train(cfg, tmp_path, ds, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40] and rows[-1]["final"]
    for key in ("step", "train_loss", "val_loss", "tokens_seen", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in rows)
    assert rows[-1]["tokens_seen"] == 40 * 4 * 16
    assert (final["val_loss"] < rows[0]["val_loss"]
            < torch.log(torch.tensor(float(cfg.model.vocab_size))).item())
    assert checkpoint.find(tmp_path,
                           "best").name == "best" and checkpoint.find(tmp_path, "last").name == "last"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # muon: two optimizers' states saved and restored
def test_resume_is_bit_identical(text_file, tmp_path, optimizer):
    cfg = tiny_config(max_iters=8, optimizer=optimizer)
    cfg.model.dropout = 0.1  # dropout makes the result depend on the restored RNG state too
    straight = tmp_path / "straight"
    train(cfg, straight, prepared(text_file, cfg, straight), log=lambda m: None)

    halves = tmp_path / "halves"
    ds = prepared(text_file, cfg, halves)
    first = config.from_dict(cfg.to_dict())
    first.train.max_iters, first.train.lr_decay_iters = 4, 8  # stop half-way through the same schedule
    train(first, halves, ds, log=lambda m: None)
    train(cfg, halves, ds, resume_from=checkpoint.newest(halves), log=lambda m: None)

    a, b = weights(straight / "checkpoints" / "last"), weights(halves / "checkpoints" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_with_patience(text_file, tmp_path):
    cfg = tiny_config(max_iters=200, eval_interval=2, patience=1, lr=0.0, warmup_iters=0, min_lr=0.0)
    final = train(cfg, tmp_path, prepared(text_file, cfg, tmp_path), log=lambda m: None)
    assert final["stopped_early"] and final["step"] == 4  # lr 0: the second evaluation cannot improve


def scale_loss(monkeypatch, factor: float, hit) -> None:
    """Multiply the loss of the training forward passes whose number (from 1) `hit` accepts by factor."""
    original = GPT.forward
    calls = {"n": 0}

    def scaled(self, idx, targets=None, cache=None, segments=None):
        logits, loss = original(self, idx, targets, cache, segments)
        if self.training:
            calls["n"] += 1
            if hit(calls["n"]):
                loss = loss * factor
        return logits, loss
    monkeypatch.setattr(GPT, "forward", scaled)


@pytest.fixture
def nan_at_step_5(monkeypatch):
    scale_loss(monkeypatch, float("nan"), lambda n: n == 5)


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(text_file, tmp_path, nan_at_step_5):
    cfg = tiny_config(max_iters=8, checkpoint_interval=2, eval_interval=100)
    with pytest.raises(TinyGPTError,
                       match=r"non-finite loss or gradient at step 5 .*last good checkpoint: .*last"):
        train(cfg, tmp_path, prepared(text_file, cfg, tmp_path), log=lambda m: None)


def test_nonfinite_steps_can_be_skipped(text_file, tmp_path, nan_at_step_5):
    cfg = tiny_config(max_iters=8, skip_nonfinite=True)
    messages = []
    final = train(cfg, tmp_path, prepared(text_file, cfg, tmp_path), log=messages.append)
    assert final["step"] == 8 and any("step 5: non-finite" in m for m in messages)
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "checkpoints" / "last").values())


def test_compile_failure_falls_back_to_eager_with_a_notice(monkeypatch):
    def broken_compile(model):
        def fails(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nlong details")
        return fails
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = GPT(config.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=10))
    notes = []
    forward = MaybeCompiled(model, True, notes.append)
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert torch.equal(forward(idx)[0], model(idx)[0])
    assert notes == ["note: torch.compile failed (no C++ compiler found); continuing without it"]
    forward(idx)
    assert len(notes) == 1  # said once


@pytest.mark.parametrize("budget, expected", [(0.01, (1, 2, 16)), (1e6, (2, 2, 32))])
def test_auto_size_picks_the_largest_shape_the_budget_can_feed(text_file, tmp_path, monkeypatch, budget,
                                                               expected):
    import tinygpt.train.schedule as train_mod
    monkeypatch.setattr(train_mod, "SIZE_LADDER", ((1, 2, 16), (1, 2, 24), (2, 2, 32)))
    cfg = tiny_config(time_budget=budget)
    cfg.model.auto_size = True
    ds = prepared(text_file, cfg, tmp_path)
    logged = []
    seconds = train_mod.choose_size(cfg, ds, torch.device("cpu"), None, logged.append)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == expected and seconds > 0
    assert logged[-1].startswith(f"auto size: chose n_layer {expected[0]}, n_head {expected[1]}, n_embd "
                                 f"{expected[2]} (")
    # with a tiny budget it stops timing at the first shape that is too big: the larger ones are never built
    assert sum("would see" in m for m in logged) == (1 if budget < 1 else 3)


def test_auto_size_needs_a_time_budget():
    with pytest.raises(config.UsageError, match="time_budget"):
        config.resolve(flags={"model.auto_size": True})


def test_the_trainer_has_all_its_parts_once_it_is_made(text_file, tmp_path):
    """Starting, stepping, evaluating and finishing add no attribute that __init__ did not declare."""
    cfg = tiny_config()
    trainer = Trainer(cfg, tmp_path, prepared(text_file, cfg, tmp_path), log=lambda m: None)
    parts = set(vars(trainer))
    trainer.start()
    trainer.step()
    trainer.evaluate_and_keep()
    trainer.finish()
    assert set(vars(trainer)) == parts


def test_the_final_evaluation_spreads_a_capped_share_over_a_large_val_split(text_file, tmp_path):
    logs = {}
    for cap in (None, 64):  # 64 tokens are 4 windows of 16; the fixture's val split holds more
        cfg = tiny_config(final_eval_tokens=cap)
        run_dir = tmp_path / f"run-{cap}"
        lines = []
        train(cfg, run_dir, prepared(text_file, cfg, run_dir), log=lines.append)
        logs[cap] = next(x for x in lines if x.startswith("final"))
    assert "(whole val split)" in logs[None]
    assert "(4 of the val split's" in logs[64] and "windows, spread)" in logs[64]


@pytest.fixture
def overflow_at_step_2(monkeypatch):
    """Blow up the second training forward pass's loss (and every 8th after it) so that its float16
    gradients overflow at any loss scale while the loss itself stays finite in float32."""
    scale_loss(monkeypatch, 1e30, lambda n: n % 8 == 2)


def state_of(run_dir):
    return json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["progress"]


def test_float16_with_loss_scaling_trains_and_skips_an_overflowing_step(text_file, tmp_path,
                                                                        overflow_at_step_2):
    cfg = tiny_config(max_iters=24, eval_interval=12, lr=1e-2, dtype="float16")
    lines = []
    final = train(cfg, tmp_path, prepared(text_file, cfg, tmp_path), log=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "fp16 autocast with loss scaling" in next(x for x in lines if x.startswith("model:"))
    # steps 2, 10 and 18 overflow
    assert final["step"] == 24 and final["overflow_skips"] == 3 and "2 fp16 overflow skip(s)" in lines[1]
    assert final["val_loss"] < rows[0]["val_loss"] < torch.log(torch.tensor(float(cfg.model.vocab_size)))
    progress = state_of(tmp_path)
    assert progress["overflow_skips"] == 3
    assert progress["scaler"]["scale"] == 2.0**13  # the scaler halved its first scale, 2**16, at each
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "checkpoints" / "last").values())


def test_a_nan_loss_still_stops_a_float16_run(text_file, tmp_path, nan_at_step_5):
    """Loss scaling forgives overflowing gradients, not a loss that is already NaN."""
    cfg = tiny_config(max_iters=8, checkpoint_interval=2, eval_interval=100, dtype="float16")
    with pytest.raises(TinyGPTError, match=r"non-finite loss or gradient at step 5"):
        train(cfg, tmp_path, prepared(text_file, cfg, tmp_path), log=lambda m: None)


def test_float16_resume_is_bit_identical_with_the_scalers_state(text_file, tmp_path, overflow_at_step_2):
    """The overflow at step 2 halves the loss scale; the resumed run goes on from that scale and from the
    count of clean steps towards its next doubling."""
    cfg = tiny_config(max_iters=8, dtype="float16")
    cfg.model.dropout = 0.1
    straight = tmp_path / "straight"
    train(cfg, straight, prepared(text_file, cfg, straight), log=lambda m: None)

    halves = tmp_path / "halves"
    ds = prepared(text_file, cfg, halves)
    first = config.from_dict(cfg.to_dict())
    first.train.max_iters, first.train.lr_decay_iters = 4, 8
    train(first, halves, ds, log=lambda m: None)
    assert state_of(halves)["scaler"]["scale"] == 2.0**15
    train(cfg, halves, ds, resume_from=checkpoint.newest(halves), log=lambda m: None)

    a, b = weights(straight / "checkpoints" / "last"), weights(halves / "checkpoints" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert state_of(halves)["overflow_skips"] == state_of(straight)["overflow_skips"] == 1
    # the scale (2**15), and the clean steps counted towards its next doubling, as if never stopped
    assert state_of(halves)["scaler"] == state_of(straight)["scaler"]


def test_out_of_memory_ends_in_one_line_and_keeps_the_checkpoint(text_file, tmp_path, monkeypatch, capsys):
    from conftest import tiny_flags
    from tinygpt.cli import main
    from tinygpt.train import loop

    original, calls = loop.train_step, {"n": 0}

    def runs_out_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "train_step", runs_out_at_step_5)
    out = tmp_path / "run"
    code = main(["train", "--data", str(text_file), "--tokenizer", "char", "--out", str(out),
                 *tiny_flags(**{"train.checkpoint_interval": 3})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: out of memory on cpu at step 5 (micro-batch 4 x context 16): try "
                              "--train.batch_size 2 --train.grad_accum 2 (the same global batch)")
    assert "Traceback" not in "\n".join(err) and "Last checkpoint kept:" in err[-1]
    assert state_of(out)["step"] == 3
