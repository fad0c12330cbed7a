"""Run directories: the one place that creates, resumes and opens them (their layout: rundir.py).

`create` and `resume` return a Run ready to train; `load` opens a trained run's checkpoint for sample,
chat, eval and everything that starts from a trained model.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt import checkpoint, config, rundir
from tinygpt.config import Config
from tinygpt.data.prepare import Dataset, check_length, copy_to, load_prepared, prepare
from tinygpt.data.templates import TEMPLATES, ChatTemplate
from tinygpt.device import autocast_dtype, resolve_device
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.infer.quantize import DTYPES, auto_dtype, quantize
from tinygpt.init_from import Source, grow_vocab, open_source
from tinygpt.rundir import RunLock, describe, holder
from tinygpt.tokenizer import GPT2Tokenizer
from tinygpt.train import loggers
from tinygpt.train.distributed import SINGLE, Dist, for_run, from_main, meet, start_group
from tinygpt.train.fit import fit_batch
from tinygpt.train.loop import train
from tinygpt.train.schedule import choose_size

Log = Callable[[str], None]


@dataclass
class Run:
    """A run directory ready to train: its config, its prepared data and, when resuming, the verified
    checkpoint."""

    dir: Path
    config: Config
    data: Dataset
    checkpoint: Path | None = None  # where training continues from; None: step 0
    sizing_s: float = 0.0  # seconds model.auto_size spent timing shapes, which count against the time budget
    source: Source | None = None  # the weights step 0 starts from (train.init_from), grown to the tokenizer
    lock: RunLock | None = None  # held while this process may train the run (rank 0's only, under torchrun)
    preset: str | None = None  # the recipe it was made from, for `tinygpt runs`

    def train(self, log: Log = print, dist: Dist = SINGLE) -> dict[str, Any]:
        """Train to the end of the schedule (as process `dist` of a torchrun job); returns the final metrics.
        The run's lock is released when training ends, however it ends."""
        try:
            if self.checkpoint is None and self.config.train.init_from and self.source is None:
                # resumed before step 1
                self.source = grow_vocab(open_init_source(self.config), self.data.tokenizer)
            state = self.source.state if self.source else None
            dist = for_run(dist, self.config.train)
            logs = loggers.open_loggers(self.config, self.dir, self.preset) if dist.main else []
            return train(self.config, self.dir, self.data, self.checkpoint, log, self.sizing_s, state, dist,
                         logs)
        finally:
            if self.lock is not None:
                self.lock.release()


def shared(make: Callable[[], Run], dist: Dist, setup_timeout: float) -> Run:
    """The run that `make` creates or resumes, on every process of a torchrun job: rank 0 makes it (prepares
    the data, sizes the model, writes the directory) while the others wait (up to setup_timeout seconds),
    then they open the same run, so every decision in it is taken once; then every process joins the process
    group that the run's config asks for (see start_group). A failure on rank 0 ends every process."""
    if not dist.active:
        return make()
    store = meet(dist, setup_timeout)
    run, error = None, None
    if dist.main:
        try:
            run = make()
        except TinyGPTError as e:
            error = e
    made = from_main(store, dist, None if run is None else {
        "dir": str(run.dir), "config": run.config.to_dict(),
        "checkpoint": run.checkpoint and str(run.checkpoint), "sizing_s": run.sizing_s})
    if error is not None:
        raise error
    if made is None:
        raise TinyGPTError("process 0 could not set up the run; see its message")
    if run is None:
        run_dir, ckpt = Path(made["dir"]), Path(made["checkpoint"]) if made["checkpoint"] else None
        run = Run(run_dir, config.from_dict(made["config"]), load_prepared(run_dir / rundir.DATA), ckpt,
                  made["sizing_s"])
    try:
        start_group(dist, run.config.train, store)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise
    return run


def open_init_source(cfg: Config) -> Source:
    """train.init_from's weights; a Hugging Face folder without a vocabulary gets the standard GPT-2 one."""
    return open_source(cfg.train.init_from, lambda: GPT2Tokenizer.build(cfg.data.gpt2_ranks, []))


def start_from(cfg: Config, log: Log) -> Source:
    """Open train.init_from and make cfg describe it: its architecture (keeping the command's dropout) and
    its tokenizer kind."""
    source = open_init_source(cfg)
    cfg.model = dataclasses.replace(source.model, dropout=cfg.model.dropout, auto_size=False)
    cfg.data.tokenizer = source.tokenizer.kind  # type: ignore[assignment]
    m = cfg.model
    log(f"init from {source.description}: its architecture ({m.n_layer} layers, {m.n_embd} wide, {m.n_head} "
        f"heads, context {m.block_size}) and its {source.tokenizer.kind} tokenizer "
        f"({source.tokenizer.vocab_size} ids)")
    return source


def create(cfg: Config, out: Path | None = None, overwrite: bool = False, log: Log = print,
           preset: str | None = None) -> Run:
    """A new run in `out` (default runs/<timestamp>): prepares the data, takes the vocabulary size from the
    tokenizer, checks the data is long enough, sizes the model when model.auto_size asks, then writes the
    directory and takes its lock. Everything that can fail on bad input fails before the directory is
    touched."""
    run_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UsageError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    if run_dir.exists() and (who := holder(run_dir)) is not None:
        raise UsageError(f"cannot overwrite {run_dir}: it is being trained by {describe(who)}")
    loggers.require(cfg)
    source = start_from(cfg, log) if cfg.train.init_from else None
    ds = prepare(cfg, log=log, tokenizer=source.tokenizer if source else None)
    if source:
        source = grow_vocab(source, ds.tokenizer)
        if source.model.vocab_size > cfg.model.vocab_size:
            log(f"init from: {source.model.vocab_size - cfg.model.vocab_size} new token row(s) for "
                + ", ".join(t for t, i in ds.tokenizer.special_tokens.items() if i >= cfg.model.vocab_size))
        cfg.model.vocab_size = source.model.vocab_size
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = ds.tokenizer.vocab_size
    elif cfg.model.vocab_size < ds.tokenizer.vocab_size:
        raise UsageError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{ds.tokenizer.vocab_size} ids; leave it empty to take it from the tokenizer")
    check_length(ds, cfg.model.block_size)
    device = resolve_device(cfg.train.device)
    # the seconds spent sizing count against a time budget
    sizing_s = choose_size(cfg, ds, device, autocast_dtype(cfg.train, device),
                           log) if cfg.model.auto_size else 0.0
    if cfg.train.auto_batch:
        start = time.perf_counter()
        fit_batch(cfg, device, autocast_dtype(cfg.train, device), log)
        sizing_s += time.perf_counter() - start
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    lock = RunLock.acquire(run_dir)
    ds = copy_to(ds, run_dir / rundir.DATA)
    config.save(cfg, run_dir / rundir.CONFIG)
    log(f"run directory: {run_dir}")
    return Run(run_dir, cfg, ds, sizing_s=sizing_s, source=source, lock=lock, preset=preset)


def resume(run_dir: Path, flags: dict[str, Any], preset: str | None = None,
           config_file: str | Path | None = None,
           log: Log = print) -> Run:
    """The run in run_dir, continued from its newest valid checkpoint (verified once) with the changes that
    the command asks for (see resumed_config)."""
    if not run_dir.is_dir():
        raise UsageError(f"cannot resume: run directory {run_dir} does not exist")
    lock = RunLock.acquire(run_dir)  # refuses a run that another process is training
    try:
        return resumed(run_dir, lock, flags, preset, config_file, log)
    except BaseException:
        lock.release()
        raise


def resumed(run_dir: Path, lock: RunLock, flags: dict[str, Any], preset: str | None,
            config_file: str | Path | None,
            log: Log) -> Run:
    """resume's work once the run is locked."""
    ckpt = checkpoint.newest(run_dir, warn=log)
    if ckpt is None and not (run_dir / rundir.CONFIG).is_file():
        raise UsageError(f"cannot resume: {run_dir} holds no checkpoint and no config.yaml (it never got "
                         "as far as training); start it again with --overwrite")
    if ckpt is None:
        log(f"{run_dir} has no checkpoint yet: starting it from step 0 with its saved config")
    saved = config.from_dict(config.load_yaml((ckpt or run_dir) / rundir.CONFIG))
    cfg = resumed_config(saved, flags, preset, config_file, log)
    loggers.require(cfg)
    return Run(run_dir, cfg, load_prepared(run_dir / rundir.DATA), ckpt, lock=lock, preset=preset)


def may_change_on_resume(key: str) -> bool:
    """train.* and sample.* may change when a run is resumed; the model and data may not, nor the optimizer or
    the parallel mode, whose saved state belongs to the one that wrote it, nor the weights the run started
    from."""
    return key.startswith(("train.", "sample.")) and key not in ("train.optimizer", "train.init_from",
                                                                 "train.parallel")


def resumed_config(saved: Config, flags: dict[str, Any], preset: str | None = None,
                   config_file: str | Path | None = None, log: Log = print) -> Config:
    """The saved config with the changes the command asks for. With --preset or --config the command is
    resolved as a new run would be and compared with the saved config, so repeating the original command
    changes nothing; flags alone apply on top of the saved config. A change outside may_change_on_resume
    is refused, naming each key."""
    before = flat(saved)
    if preset or config_file:
        after = flat(config.resolve(preset, config_file, flags))
        # what a new run fills in itself: an empty vocab_size becomes the tokenizer's, auto_size picks the
        # shape
        derived = {k for k in config.SHAPE_KEYS if after["model.auto_size"]}
        derived |= {"model.vocab_size"} if after["model.vocab_size"] is None else set()
    else:
        wanted = config.from_dict(saved.to_dict())
        config.apply_layer(wanted, flags, "command line")
        config.validate(wanted)
        after, derived = flat(wanted), set()
    if after["train.auto_batch"]:  # chosen when the run was created: the run keeps its choice
        derived |= {"train.batch_size", "train.grad_accum", "train.auto_batch"}
    changed = [k for k in before if before[k] != after[k] and k not in derived]
    refused = [k for k in changed if not may_change_on_resume(k)]
    if refused:
        raise UsageError("on --resume only train.* (but not train.optimizer, train.parallel or "
                         "train.init_from) and sample.* settings may change; start a new run to change "
                         f"{', '.join(refused)}")
    cfg = config.from_dict(saved.to_dict())
    config.apply_overrides(cfg, {k: after[k] for k in changed}, "command line")
    config.validate(cfg)
    if changed:
        log("resuming with " + ", ".join(f"{k} {after[k]} (was {before[k]})" for k in changed))
    return cfg


def flat(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{name}": value for section, fields in cfg.to_dict().items() for name,
            value in fields.items()}


def load(path: str | Path, which: str = "last", device: str = "auto", warn: Log | None = None,
         dtype: str = "float32") -> checkpoint.Checkpoint:
    """A trained run's model, tokenizer and config: checkpoint `which` (last or best, falling back to the
    other)
    of the run directory `path`, or the checkpoint directory `path` itself; verified once, on `device`, its
    weights in `dtype` for decoding (float32, bfloat16 or int8; auto: see auto_dtype)."""
    if dtype not in ("auto", *DTYPES):
        raise UsageError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    where = resolve_device(device)
    if dtype == "int8" and where.type != "cpu":
        raise UsageError(f"int8 decoding runs on the CPU (its kernels are CPU kernels), not {where}; use "
                         "--device cpu, or --dtype float32 or bfloat16 here")
    ckpt = checkpoint.load(checkpoint.locate(Path(path), which, warn=warn), where, verified=True)
    if dtype == "auto":
        auto_dtype(ckpt, warn or (lambda msg: None))
    else:
        quantize(ckpt.model, dtype)
    return ckpt


def trained_template(ckpt: checkpoint.Checkpoint) -> ChatTemplate | None:
    """The chat template the run was trained with, or None for a run trained on plain text."""
    template = TEMPLATES[ckpt.config.data.chat_template]
    return template if set(template.specials) <= set(ckpt.tokenizer.special_tokens) else None


def chat_template(ckpt: checkpoint.Checkpoint) -> ChatTemplate:
    """The chat template the run was trained with; refuses a run trained on plain text."""
    template = trained_template(ckpt)
    if template is None:
        raise TinyGPTError(f"{ckpt.home} was trained on plain text, not conversations; chat needs a run "
                           "trained on dialog data (e.g. `tinygpt train` with no --data, or a .jsonl file)")
    return template
