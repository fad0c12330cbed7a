"""train.log: TensorBoard's and W&B's files, read back with their own readers, hold metrics.jsonl's
scalars."""

import glob
import json
import struct
import sys
import time

import pytest

from conftest import tiny_flags
from tinygpt.cli import main


def train(tmp_path, text_file, *flags):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--tokenizer", "char", "--out", str(out),
                 *tiny_flags(**{"train.max_iters": 9}), *flags]) == 0
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_file_holds_every_logged_scalar_and_the_config(tmp_path, text_file):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out, metrics = train(tmp_path, text_file, "--train.log", "tensorboard")
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for key in ("train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "tokens_seen", "elapsed_s"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [m["step"] for m in metrics]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    assert [e.value for e in acc.Scalars("val_bpb")] == pytest.approx([metrics[-1]["val_bpb"]], rel=1e-6)
    assert "model.n_embd" in (
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"].decode("latin-1"))
    assert "n_layer: 1" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def wandb_records(path):
    """The records of a .wandb file: a 7-byte header, then LevelDB-log chunks (7-byte header: crc32, length,
    type full/first/middle/last) in 32 KiB blocks, each record a protobuf wandb Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = open(path, "rb").read(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_history(path, count, timeout_s=300):
    """The history records of a .wandb file, polled for until there are `count` of them (or the time is up):
    W&B's own service process writes the file, which on a loaded machine was seen to hold none yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                   for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]
        if len(history) >= count or time.monotonic() > deadline:
            return history
        time.sleep(0.2)


def test_wandb_offline_run_holds_every_logged_scalar(tmp_path, text_file, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'tinygpt[wandb]')")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    out, metrics = train(tmp_path, text_file, "--train.log", "wandb")
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))  # offline: nothing configured
    history = wandb_history(run_file, len(metrics))
    assert [h["_step"] for h in history] == [m["step"] for m in metrics]
    for h, m in zip(history, metrics):
        for key in ("train_loss", "val_loss", "lr", "tokens_seen"):
            assert h[key] == pytest.approx(m[key], rel=1e-9)
    assert history[-1]["val_bpb"] == pytest.approx(metrics[-1]["val_bpb"])


def test_an_unknown_log_target_is_refused_before_anything_is_written(tmp_path, text_file, capsys):
    assert main(["train", "--data", str(text_file), "--out", str(tmp_path / "r"), *tiny_flags(),
                 "--train.log", "mlflow"]) == 2
    assert "train.log: unknown mlflow; choose from tensorboard, wandb" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_missing_logger_package_is_named_with_its_extra(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    assert main(["train", "--data", str(text_file), "--out", str(tmp_path / "r"), *tiny_flags(),
                 "--train.log", "wandb"]) == 1
    assert "error: --train.log wandb needs wandb: pip install 'tinygpt[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before the run directory was made
