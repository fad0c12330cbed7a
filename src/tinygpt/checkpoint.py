"""Checkpoints: one self-contained directory each, written so that a crash never leaves a bad one.

Layout of a checkpoint directory::

    model.safetensors   weights (safetensors: loading it can run no code)
    config.yaml         the fully resolved config
    tokenizer/          the tokenizer's files
    trainer.pt          optimizer state and torch RNG states (tensors only; loaded with weights_only=True)
    state.json          step, data position, best val loss, python/numpy RNG states
    manifest.json       size and sha256 of every file above, written last

A checkpoint is assembled in a hidden temporary sibling, fsynced, and renamed into
place (rundir.atomic_folder); the previous version is kept (as ``.old-NAME``) until the new one is in place,
and the ``latest`` pointer file is updated only after that.
A directory whose files do not match its manifest is not loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from tinygpt import config as config_mod
from tinygpt import rundir
from tinygpt.config import Config
from tinygpt.errors import TinyGPTError
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"  # written last: a folder with one is a complete checkpoint (verify checks it)
WEIGHTS = "model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(dest: Path, model: GPT, cfg: Config, tokenizer: Tokenizer,
         trainer: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> None:
    """Atomically write (or replace) the checkpoint directory `dest`, then point `latest` at it."""
    with rundir.atomic_folder(dest) as tmp:
        try:
            _write_files(tmp, model, cfg, tokenizer, trainer, state)
        except (RuntimeError, SafetensorError) as e:
            raise TinyGPTError(f"could not write checkpoint {dest} ({str(e).splitlines()[0][:200]}); the "
                               "disk may be full: free some disk space or choose another --out (the previous "
                               "checkpoint is kept)") from None
    # The pointer moves only once the checkpoint it names is complete and in place.
    with rundir.atomic_file(dest.parent / rundir.LATEST) as pointer:
        pointer.write_text(dest.name + "\n")


def _write_files(folder: Path, model: GPT, cfg: Config, tokenizer: Tokenizer,
                 trainer: dict[str, Any] | None, state: dict[str, Any] | None) -> None:
    """The checkpoint's files and their manifest. A full disk surfaces from torch.save as a
    RuntimeError ("unexpected pos ...") and from safetensors as a SafetensorError, neither an OSError:
    save() turns both into one TinyGPTError, so the user sees one line instead of a traceback."""
    save_model(model, str(folder / WEIGHTS))  # drops the tied lm_head copy; load_model restores it
    config_mod.save(cfg, folder / rundir.CONFIG)
    tokenizer.save(folder / "tokenizer")
    if trainer is not None:
        torch.save(trainer, folder / "trainer.pt")
    (folder / "state.json").write_text(json.dumps(state or {}, indent=2))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def weights_hash(ckpt: Path) -> str:
    """sha256 over the weight tensors (names, dtypes, shapes, bytes): equal iff the weights are bit-identical,
    whatever the file layout."""
    h = hashlib.sha256()
    with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify(ckpt: Path) -> None:
    """Raise TinyGPTError unless every file listed in the manifest is present with its recorded size and
    hash."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise TinyGPTError(f"checkpoint {ckpt} is incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TinyGPTError(f"checkpoint {ckpt} has a corrupt manifest.json") from None
    for name, info in manifest.items():
        p = ckpt / name
        if not p.is_file():
            raise TinyGPTError(f"checkpoint {ckpt} is missing {name}")
        if p.stat().st_size != info["size"] or _sha256(p) != info["sha256"]:
            raise TinyGPTError(f"checkpoint {ckpt}: {name} is truncated or modified (size/hash differ from "
                               "the manifest)")


def candidates(run_dir: Path, names: tuple[str, ...] = ("best", "last")) -> list[Path]:
    """The checkpoint folders of `names` that exist (not verified), each followed by its previous version kept
    during a swap (.old-NAME) where there is one."""
    folders = [rundir.checkpoint_dir(run_dir, name) for name in names]
    return [ckpt for folder in folders for ckpt in (folder, rundir.previous(folder)) if ckpt.exists()]


def valid_checkpoints(run_dir: Path, names: tuple[str, ...] = ("best", "last"), warn=None) -> list[Path]:
    """Checkpoints that pass verify(), in the order of `names`; each name may also exist as the
    previous version kept during a swap (.old-NAME). Invalid ones are reported through `warn`."""
    found = []
    for ckpt in candidates(run_dir, names):
        try:
            verify(ckpt)
            found.append(ckpt)
        except TinyGPTError as e:
            if warn:
                warn(f"warning: skipping {e}")
    return found


def find(run_dir: Path, which: str = "best", warn=None) -> Path:
    """Checkpoint `which` ('best' or 'last'), verified, falling back to the other if it is missing or damaged
    (the other is only read when it is needed)."""
    if not Path(run_dir).is_dir():
        raise TinyGPTError(f"run directory {run_dir} does not exist")
    for name in (which, "last" if which == "best" else "best"):
        found = valid_checkpoints(run_dir, (name,), warn)
        if found:
            return found[0]
    raise TinyGPTError(f"no usable checkpoint in {run_dir}; train one with `tinygpt train --out {run_dir}`")


def locate(path: Path, which: str = "last", warn=None) -> Path:
    """The verified checkpoint that `path` names: the checkpoint folder itself, or checkpoint `which` of the
    run directory `path` (see find)."""
    if (path / MANIFEST).is_file():
        verify(path)
        return path
    return find(path, which, warn=warn)


def newest(run_dir: Path, warn=None) -> Path | None:
    """What --resume continues from, verified: the checkpoint named by the `latest` pointer if it is valid,
    else the valid checkpoint with the most training steps; None when there is none."""
    pointer = Path(run_dir) / rundir.CHECKPOINTS / rundir.LATEST
    if pointer.is_file():
        named = pointer.parent / pointer.read_text().strip()
        try:
            verify(named)
            return named
        except TinyGPTError as e:
            if warn:
                warn(f"warning: the latest checkpoint is unusable ({e}); looking for an older one")
    found = valid_checkpoints(run_dir, warn=warn)
    return max(found, key=steps_of, default=None)


def steps_of(ckpt: Path) -> int:
    """The training step a checkpoint was written at."""
    return json.loads((ckpt / "state.json").read_text()).get("progress", {}).get("step", 0)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (on its device), its config and tokenizer, and the training state."""

    path: Path
    model: GPT
    config: Config
    tokenizer: Tokenizer
    state: dict[str, Any]

    @property
    def run_dir(self) -> Path | None:
        """The run directory the checkpoint belongs to; None for a checkpoint folder standing on its own."""
        return rundir.run_of(self.path)

    @property
    def home(self) -> Path:
        """What messages and model names call the checkpoint: its run directory, else the folder itself."""
        return self.run_dir or self.path

    @property
    def step(self) -> int | None:
        return self.state.get("progress", {}).get("step")

    def trainer_state(self) -> dict[str, Any]:
        return torch.load(self.path / "trainer.pt", map_location="cpu", weights_only=True)


def load(ckpt: Path, device: str | torch.device = "cpu", into: GPT | None = None,
         verified: bool = False) -> Checkpoint:
    """Load a checkpoint, verifying it against its manifest unless the caller just did (`verified`). With
    `into`, the weights go into that model (which must have the checkpoint's shapes) instead of a new one:
    resuming a large model then holds one copy, not two."""
    if not verified:
        verify(ckpt)
    try:
        cfg = config_mod.from_dict(yaml.safe_load((ckpt / rundir.CONFIG).read_text()))
        tokenizer = load_tokenizer(ckpt / "tokenizer")
        model = GPT(cfg.model) if into is None else into
        load_model(model, str(ckpt / WEIGHTS), device=str(device))
    except (SafetensorError, RuntimeError, yaml.YAMLError) as e:
        raise TinyGPTError(f"checkpoint {ckpt} cannot be loaded: {str(e).splitlines()[0]}") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TinyGPTError(f"checkpoint {ckpt}: tokenizer has {tokenizer.vocab_size} ids but the model only "
                           f"{model.config.vocab_size}; the checkpoint's files do not belong together")
    state = json.loads((ckpt / "state.json").read_text())
    return Checkpoint(ckpt, model.to(device), cfg, tokenizer, state)
