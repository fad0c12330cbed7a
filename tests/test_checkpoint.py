import hashlib
import json
import os
import pickle

import pytest
import torch

from tinygpt import checkpoint, config
from tinygpt.errors import TinyGPTError
from tinygpt.model import GPT
from tinygpt.tokenizer import build_tokenizer


@pytest.fixture
def saved(tmp_path):
    tok = build_tokenizer("char", ["hello world"])
    cfg = config.resolve("cpu-tiny", flags={"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 8,
                                "model.block_size": 8, "model.vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    dest = tmp_path / "checkpoints" / "last"
    checkpoint.save(dest, model, cfg, tok, trainer={"x": torch.ones(2)}, state={"progress": {"step": 3}})
    return tmp_path, dest, model


def test_round_trip_restores_weights_and_tied_head(saved):
    run, dest, model = saved
    loaded = checkpoint.load(dest)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.model.state_dict().values()))
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    assert loaded.tokenizer.encode("hello") == build_tokenizer("char", ["hello world"]).encode("hello")
    assert loaded.state["progress"]["step"] == 3
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_replacing_keeps_one_valid_copy(saved):
    run, dest, model = saved
    tok = checkpoint.load(dest).tokenizer
    checkpoint.save(dest, model, checkpoint.load(dest).config, tok, state={"progress": {"step": 9}})
    assert checkpoint.load(checkpoint.newest(run)).state["progress"]["step"] == 9
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "latest"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "last"


def test_truncated_weights_are_detected_and_skipped(saved):
    run, dest, _ = saved
    f = dest / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(TinyGPTError, match="truncated or modified"):
        checkpoint.load(dest)
    warnings = []
    with pytest.raises(TinyGPTError, match="no usable checkpoint"):
        checkpoint.find(run, "best", warn=warnings.append)
    assert warnings and "model.safetensors" in warnings[0]


def test_previous_version_is_used_when_a_swap_was_interrupted(saved):
    run, dest, _ = saved
    os.rename(dest, dest.parent / ".old-last")  # crash between the two renames
    assert checkpoint.find(run, "last").name == ".old-last"


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_planted_pickle_is_refused_not_executed(saved, monkeypatch):
    run, dest, _ = saved
    monkeypatch.chdir(run)
    (dest / "trainer.pt").write_bytes(pickle.dumps({"optimizer": Exploit()}))
    # Even with the manifest bypassed, loading the trainer state must not run the payload.
    loaded = checkpoint.Checkpoint(dest, None, None, None, {})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        loaded.trainer_state()
    assert not (run / "pwned").exists()


def test_a_config_that_does_not_match_the_weights_is_refused(saved):
    run, dest, _ = saved
    cfg_file = dest / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("n_layer: 1", "n_layer: 2"))
    manifest = json.loads((dest / "manifest.json").read_text())  # forge a consistent manifest
    manifest["config.yaml"] = {"size": cfg_file.stat().st_size,
                               "sha256": hashlib.sha256(cfg_file.read_bytes()).hexdigest()}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TinyGPTError, match="cannot be loaded"):
        checkpoint.load(dest)


def test_weights_hash_tracks_the_weights_only(saved, tmp_path):
    run, dest, model = saved
    loaded = checkpoint.load(dest)
    copy = tmp_path / "copy"
    checkpoint.save(copy, loaded.model, loaded.config, loaded.tokenizer, state={"other": 1})
    assert checkpoint.weights_hash(copy) == checkpoint.weights_hash(dest)
    with torch.no_grad():
        loaded.model.transformer.wte.weight[0, 0] += 1e-6
    checkpoint.save(copy, loaded.model, loaded.config, loaded.tokenizer)
    assert checkpoint.weights_hash(copy) != checkpoint.weights_hash(dest)
