"""The run API (tinygpt.run): creating, resuming and opening run directories, and the public Python API."""

import json
import subprocess
import sys

import pytest

import tinygpt
from conftest import tiny_flags
from tinygpt import checkpoint, config
from tinygpt import run as runs
from tinygpt.cli import main
from tinygpt.errors import UsageError


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def original(text_file, tmp_path):
    """The command line of a small cpu-tiny run, as a user would first type it."""
    return ["train", "--data", text_file, "--tokenizer", "char", "--preset", "cpu-tiny", *tiny_flags(),
            "--out", tmp_path / "run"]


def steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Defect: repeating the original command with --resume appended was refused as a change of preset.
def test_repeating_the_original_command_with_resume_is_accepted(original, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(capsys, *original)[0] == 0
    code, _, err = cli(capsys, *original, "--resume")
    assert code == 0, err
    assert "resuming from" in err and "resuming with" not in err  # nothing changed
    code, _, err = cli(capsys, *original, "--resume", "--train.max_iters", 9)
    assert code == 0, err
    assert "resuming with train.max_iters 9 (was 6)" in err and steps(run_dir)[-1] == 9


def test_resume_refuses_a_real_change_and_names_it(original, tmp_path, capsys):
    assert cli(capsys, *original)[0] == 0
    code, _, err = cli(capsys, *original, "--resume", "--tokenizer", "bpe")
    assert code == 2 and "start a new run to change data.tokenizer" in err
    code, _, err = cli(capsys, *[a if a != "cpu-tiny" else "gpt-lite" for a in original], "--resume")
    assert code == 2 and "model.pos" in err and "model.norm_placement" in err
    assert "the preset or config file" not in err


def test_resume_with_a_config_file_compares_what_it_resolves_to(text_file, tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  n_layer: 1\n  n_head: 2\n  n_embd: 16\n  block_size: 16\n"
                 "train:\n  max_iters: 4\n  batch_size: 4\n  eval_interval: 2\n  warmup_iters: 1\n")
    base = ["train", "--data", text_file, "--tokenizer", "char", "--config", f, "--out", tmp_path / "run"]
    assert cli(capsys, *base)[0] == 0
    f.write_text(f.read_text().replace("max_iters: 4", "max_iters: 6"))
    code, _, err = cli(capsys, *base, "--resume")
    assert code == 0, err
    assert steps(tmp_path / "run")[-1] == 6


def test_resumed_config_keeps_what_the_run_chose_itself():
    saved = config.resolve("cpu-tiny", flags={"train.time_budget": 60})
    # auto_size's pick
    saved.model.vocab_size, saved.model.n_layer, saved.model.n_embd, saved.model.n_head = 65, 4, 96, 3
    again = runs.resumed_config(saved, {"train.time_budget": 60}, "cpu-tiny", log=lambda m: None)
    assert again.to_dict() == saved.to_dict()
    with pytest.raises(UsageError, match="model.n_layer"):
        runs.resumed_config(saved, {"model.n_layer": 2}, log=lambda m: None)


def test_create_writes_the_config_once_and_resume_verifies_each_checkpoint_once(text_file, tmp_path,
                                                                                monkeypatch):
    flags = dict(zip((k.removeprefix("--") for k in tiny_flags()[::2]), tiny_flags()[1::2]))
    cfg = config.resolve(flags={**flags, "data.path": str(text_file), "data.tokenizer": "char"})
    saves = []
    real_save = config.save
    monkeypatch.setattr(config, "save", lambda c, p: (saves.append(p), real_save(c, p)))
    run = runs.create(cfg, tmp_path / "run", log=lambda m: None)
    assert (saves == [tmp_path / "run" / "config.yaml"]
            and run.config.model.vocab_size == run.data.tokenizer.vocab_size)
    run.train(log=lambda m: None)

    verified = []
    real_verify = checkpoint.verify
    monkeypatch.setattr(checkpoint, "verify", lambda c: (verified.append(c.name), real_verify(c)))
    resumed = runs.resume(tmp_path / "run", {"train.max_iters": 8}, log=lambda m: None)
    resumed.train(log=lambda m: None)
    assert verified == ["last"]  # the latest checkpoint, once; loading it for training does not hash it again
    verified.clear()
    runs.load(tmp_path / "run")
    assert verified == ["last"]


def test_the_python_api_loads_a_run_and_generates_text(original, tmp_path, capsys):
    assert cli(capsys, *original)[0] == 0
    run = tinygpt.load(tmp_path / "run")
    assert isinstance(run.model, tinygpt.GPT) and run.step == 6 and run.config.model.n_layer == 1
    text = tinygpt.generate(run, "The quick", max_new_tokens=20, temperature=0)
    assert 0 < len(text) <= 20 and text == tinygpt.generate(run, "The quick", max_new_tokens=20,
                                                            temperature=0)
    assert tinygpt.generate(run, "The", max_new_tokens=5,
                            seed=3) == tinygpt.generate(run, "The", max_new_tokens=5, seed=3)
    assert run.config.sample.max_new_tokens == 200  # the settings given to one call do not stick
    best = tinygpt.load(tmp_path / "run" / "checkpoints" / "best")
    assert best.path.name == "best"
    for bad in (-0.5, 2.5):  # the bounds tinygpt serve takes (config.SAMPLE_RANGES)
        with pytest.raises(UsageError, match=rf"^sample.temperature must be in \[0, 2\], got {bad}$"):
            tinygpt.generate(run, "The", temperature=bad)


def test_python_dash_m_tinygpt_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "tinygpt", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"tinygpt {tinygpt.__version__}"
