import hashlib
import io
import json
import os
import subprocess

import pytest

from conftest import tiny_flags
from tinygpt.cli import main


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trained(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", text_file, "--out", out, "--tokenizer", "char",
                       *tiny_flags())
    assert code == 0, err
    return out


def test_train_then_sample(trained, capsys):
    assert (trained / "config.yaml").exists() and (trained / "metrics.jsonl").exists()
    code, out, err = run(capsys, "sample", "--run", trained, "--prompt", "The quick", "--max-new-tokens", 20,
                         "--num-samples", 2, "--seed", 1)
    assert code == 0, err
    first, second = out.split("\n---------------\n")
    assert first.startswith("The quick") and second.startswith("The quick")
    assert len(first) > len("The quick")
    # same seed, same text
    assert run(capsys, "sample", "--run", trained, "--prompt", "The quick", "--max-new-tokens", 20,
               "--num-samples", 2, "--seed", 1)[1] == out


def test_resume_continues_to_a_longer_schedule(trained, capsys):
    code, _, err = run(capsys, "train", "--out", trained, "--resume", "--train.max_iters", 9)
    assert code == 0, err
    assert "resuming from" in err and "at step 6" in err
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 9
    code, _, err = run(capsys, "train", "--out", trained, "--resume", "--model.n_layer", 3)
    assert code == 2 and "settings may change" in err and "model.n_layer" in err
    code, _, err = run(capsys, "train", "--out", trained, "--resume", "--train.optimizer", "adamw")
    assert code == 2 and "train.optimizer" in err  # the saved optimizer state is Muon + AdamW


def test_existing_run_directory_is_never_overwritten_silently(trained, text_file, capsys):
    before = snapshot(trained)
    code, _, err = run(capsys, "train", "--data", text_file, "--out", trained, *tiny_flags())
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert snapshot(trained) == before
    code, _, err = run(capsys, "train", "--data", text_file, "--out", trained, "--overwrite", *tiny_flags())
    assert code == 0, err


def bad_inputs(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    no_text = tmp_path / "pictures"
    no_text.mkdir()
    (no_text / "a.png").write_bytes(b"\x89PNG")
    bad_jsonl = tmp_path / "chats.jsonl"
    bad_jsonl.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n')
    bad_yaml = tmp_path / "chats.yml"
    bad_yaml.write_text("conversations:\n- - hi\n  - [unclosed\n")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("model:\n  n_layers: 3\n")
    return [
        (["--data", tmp_path / "nope.txt"], 1, "does not exist"),
        (["--data", empty], 1, "is empty"),
        (["--data", binary], 1, "looks like a binary file"),
        (["--data", latin1], 1, "not valid UTF-8 (bad byte at offset 2)"),
        (["--data", short, "--model.block_size", 64], 1, "shorter than one training window"),
        (["--data", no_text], 1, "has no text files"),
        (["--data", bad_jsonl], 1, "chats.jsonl line 2"),
        (["--data", bad_yaml], 1, "chats.yml"),
        (["--data", text_file, "--config", bad_config], 2, "unknown config key 'model.n_layers'"),
        (["--data", text_file, "--train.batch_size", "many"], 2,
         "train.batch_size='many' is not a valid int"),
        (["--data", text_file, "--model.n_layer", 0], 2, "model.n_layer must be positive"),
        (["--data", text_file, "--train.lr", -1], 2, "train.lr must not be negative"),
        (["--data", text_file, "--model.n_embd", 30, "--model.n_head", 4], 2, "must be divisible"),
        (["--data", text_file, "--tokenizer", "words"], 2, "invalid choice"),
        (["--data", text_file, "--model.n_layers", 2], 2, "unrecognized arguments: --model.n_layers"),
        (["--data", text_file, "--preset", "gpt-9"], 2, "invalid choice"),
        (["--data", text_file, "--train.device", "tpu:7"], 2, "unknown device"),
    ]


def test_bad_input_gives_one_line_and_leaves_disk_alone(tmp_path, text_file, capsys):
    for flags, code, message in bad_inputs(tmp_path, text_file):
        before = snapshot(tmp_path)
        out_dir = tmp_path / "bad-run"
        got, _, err = run(capsys, "train", *flags, "--out", out_dir)
        assert (got, message in err) == (code, True), (flags, err)
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert err.splitlines()[-1].startswith("error: ") and len(errors) == 1 and "Traceback" not in err
        assert snapshot(tmp_path) == before and not out_dir.exists()


def test_unwritable_output_directory(text_file, capsys):
    code, _, err = run(capsys, "train", "--data", text_file, "--out", "/proc/tinygpt-run", *tiny_flags())
    assert code == 1 and "/proc/tinygpt-run" in err and "Traceback" not in err


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(trained, capsys, monkeypatch):
    before = snapshot(trained / "checkpoints")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(trained / "checkpoints"))
    monkeypatch.setattr("tinygpt.checkpoint.save_model", disk_full)
    code, _, err = run(capsys, "train", "--out", trained, "--resume", "--train.max_iters", 9)
    assert code == 1 and "No space left on device" in err and "free some disk space" in err
    assert snapshot(trained / "checkpoints") == before


def test_checkpoint_problems_are_reported_not_raised(trained, tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    code, _, err = run(capsys, "sample", "--run", tmp_path / "empty-run")
    assert code == 1 and "no usable checkpoint" in err
    code, _, err = run(capsys, "train", "--out", tmp_path / "empty-run", "--resume")
    assert code == 2 and "no checkpoint and no config.yaml" in err
    for name in ("best", "last"):
        with open(trained / "checkpoints" / name / "model.safetensors", "r+b") as f:
            f.truncate(100)
    before = snapshot(trained)
    code, _, err = run(capsys, "sample", "--run", trained)
    assert code == 1 and "truncated or modified" in err and "no usable checkpoint" in err
    assert snapshot(trained) == before


def test_sample_errors(trained, tmp_path, capsys):
    code, _, err = run(capsys, "sample", "--run", tmp_path / "missing")
    assert code == 1 and "does not exist" in err
    code, _, err = run(capsys, "sample", "--run", trained, "--prompt", "Zebra\u2603")
    assert code == 1 and "unknown to the char tokenizer" in err and "'Z'" in err
    code, _, err = run(capsys, "sample", "--run", trained, "--max-new-tokens", 0)
    assert code == 2 and "sample.max_new_tokens must be in [1, 1,000,000], got 0" in err
    code, _, err = run(capsys, "sample", "--run", trained, "--max-new-tokens", 10**12)
    assert code == 2 and "sample.max_new_tokens must be in [1, 1,000,000], got 1,000,000,000,000" in err
    refused = (("temperature", "2.5", "[0, 2]"), ("top_p", "1.5", "(0, 1]"), ("top_k", "0", ">= 1"))
    for name, value, allowed in refused:
        code, _, err = run(capsys, "sample", "--run", trained, "--" + name.replace("_", "-"), value)
        assert code == 2 and err.splitlines()[-1] == f"error: sample.{name} must be in {allowed}, got {value}"
    code, out, err = run(capsys, "sample", "--run", trained, "--prompt", "The quick " * 10,
                         "--max-new-tokens", 3)
    assert code == 0 and "only the most recent 16" in err and out.startswith("The quick")


def test_help_documents_fields_and_presets(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "cpu-tiny", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "preset cpu-tiny: The classic small CPU recipe" in out
    assert "Context window in tokens. (default: 64)" in out  # the preset's value, from the field docstring
    assert run(capsys, "frobnicate")[0] == 2


def test_chat_refuses_a_run_trained_on_plain_text(trained, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, out, err = run(capsys, "chat", "--run", trained)
    assert code == 1 and "trained on plain text" in err and out == ""


def test_auto_size_writes_the_chosen_shape_into_the_run(text_file, tmp_path, capsys, monkeypatch):
    import yaml

    import tinygpt.train.schedule as train_mod
    monkeypatch.setattr(train_mod, "SIZE_LADDER", ((1, 2, 16), (1, 2, 24)))
    # any budget affords the largest shape, even one that timing used up on a loaded machine
    monkeypatch.setattr(train_mod, "TOKENS_PER_PARAM", float("-inf"))
    out = tmp_path / "auto"
    code, _, err = run(capsys, "train", "--data", text_file, "--out", out, "--tokenizer", "char",
                       *tiny_flags(**{"train.time_budget": 2, "model.auto_size": "true"}))
    assert code == 0, err
    assert "auto size: chose n_layer 1, n_head 2, n_embd 24" in err
    for saved in (out / "config.yaml", out / "checkpoints" / "last" / "config.yaml"):
        assert yaml.safe_load(saved.read_text())["model"]["n_embd"] == 24
    code, out_text, err = run(capsys, "sample", "--run", out, "--prompt", "The", "--max-new-tokens", 5)
    assert code == 0, err


def full_disk_errors():
    from safetensors import SafetensorError
    # What the writers raise when the disk fills up (seen on a full tmpfs): neither is an OSError.
    return [("tinygpt.checkpoint.save_model",
             SafetensorError("Error while serializing: I/O error: No space left on "
                                                              "device (os error 28)")),
            ("tinygpt.checkpoint.torch.save",
             RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                           "576 vs 534"))]


# Defect: a full disk while writing a checkpoint ended in a traceback from torch's or safetensors' writer.
@pytest.mark.parametrize("writer, error", full_disk_errors(), ids=["safetensors", "torch.save"])
def test_full_disk_inside_the_checkpoint_writers_is_one_line(trained, capsys, monkeypatch, writer, error):
    before = snapshot(trained / "checkpoints")

    def disk_full(*args, **kwargs):
        raise error
    monkeypatch.setattr(writer, disk_full)
    code, _, err = run(capsys, "train", "--out", trained, "--resume", "--train.max_iters", 9)
    assert code == 1 and "Traceback" not in err, err
    assert (err.splitlines()[-1].startswith("error: could not write checkpoint")
            and "free some disk space" in err)
    assert snapshot(trained / "checkpoints") == before
    monkeypatch.undo()
    # the earlier checkpoint still loads
    assert run(capsys, "sample", "--run", trained, "--max-new-tokens", 3)[0] == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (mounting needs root; skipped where it is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_really_full_disk_while_checkpointing(text_file, small_disk, capsys):
    out = small_disk / "run"
    flags = tiny_flags(**{"model.n_embd": 64, "model.n_head": 2})
    code, _, err = run(capsys, "train", "--data", text_file, "--out", out, "--tokenizer", "char", *flags)
    assert code == 0, err
    before = snapshot(out / "checkpoints")
    filler = small_disk / "filler"
    # fill the disk, then give back a little: room for metrics only
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - 16 * 4096))
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--train.max_iters", 9)
    assert code == 1 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error")] == [err.splitlines()[-1]]
    assert "could not write checkpoint" in err and "free some disk space" in err
    filler.unlink()
    assert snapshot(out / "checkpoints") == before
    assert run(capsys, "sample", "--run", out, "--max-new-tokens", 3)[0] == 0


def test_a_train_command_resolves_its_config_and_checks_its_loggers_once(text_file, tmp_path, capsys,
                                                                          monkeypatch):
    """Once per command, new or resumed (with --preset, resume compares the command with the saved config)."""
    from tinygpt import config
    from tinygpt.train import loggers

    calls = {"resolve": 0, "require": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(config, "resolve", counted("resolve", config.resolve))
    monkeypatch.setattr(loggers, "require", counted("require", loggers.require))
    command = ["train", "--data", text_file, "--tokenizer", "char", "--preset", "cpu-tiny",
               "--out", tmp_path / "run", *tiny_flags()]
    assert run(capsys, *command)[0] == 0
    assert calls == {"resolve": 1, "require": 1}
    assert run(capsys, *command, "--resume", "--train.max_iters", 9)[0] == 0
    assert calls == {"resolve": 2, "require": 2}
