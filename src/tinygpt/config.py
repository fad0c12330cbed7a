"""Configuration: typed dataclasses are the single source of truth.

A run's config is built in layers, each overriding the last:
dataclass defaults -> ``--preset NAME`` -> ``--config FILE.yaml`` -> dotted flags
(``--model.n_layer 4``). Every layer goes through :func:`apply_overrides`, so an
unknown key or a value of the wrong type is an error wherever it comes from.
The docstring under each field is its ``--help`` text.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tinygpt.errors import UsageError
from tinygpt.presets import DEFAULT_PRESET, PRESETS


@dataclass
class ModelConfig:
    """The GPT architecture. Field names follow GPT-2 (n_layer, n_head, n_embd, ...)."""

    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 128
    """Context window in tokens."""
    vocab_size: int | None = None
    """Output vocabulary; empty means 'take it from the tokenizer'."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches."""
    bias: bool = True
    """Biases in linear layers and norms (GPT-2 has them)."""
    pos: Literal["learned", "sinusoidal", "rope"] = "learned"
    """Position encoding: learned table (GPT-2), fixed sinusoids, or rotary (RoPE)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer."""
    norm_placement: Literal["pre", "post"] = "pre"
    """'pre' normalises each branch's input (GPT-2); 'post' normalises after each residual add (original
    Transformer)."""
    mlp: Literal["gelu", "relu", "relu2", "swiglu"] = "gelu"
    """Feed-forward type: gelu is GPT-2's tanh-approximated GELU, relu2 is squared ReLU, swiglu is gated."""
    mlp_hidden: int | None = None
    """Feed-forward hidden width; empty means 4*n_embd (8/3*n_embd for swiglu, same parameter count)."""
    tie_weights: bool = True
    """Share the token embedding with the output head (GPT-2 does)."""
    head: Literal["linear", "adaptive"] = "linear"
    """Output layer: a full softmax, or an adaptive softmax (Grave et al. 2017) that is cheaper for big
    vocabularies."""
    adaptive_cutoffs: str = "auto"
    """Adaptive softmax cluster boundaries as comma-separated ids (e.g. 2000,10000); auto derives them from
    the vocabulary."""
    attn: Literal["sdpa", "einsum"] = "sdpa"
    """Attention kernel: PyTorch's fused scaled_dot_product_attention, or explicit einsum (can return the
    weights)."""
    qk_norm: bool = False
    """Normalise queries and keys per head before attention (stabilises training at higher learning rates)."""
    zero_init_proj: bool = False
    """Initialise the projections that write into the residual stream to zero, so each block starts as
    identity."""
    auto_size: bool = False
    """With train.time_budget: replace n_layer, n_embd and n_head by the size that learns most in the budget
    on
    this machine, chosen from a ladder of shapes by timing a few steps of each (docs/config.md says how)."""


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized."""

    path: str | None = None
    """A text file, a dialog file (.jsonl, chatterbot .yml, DailyDialog .txt), a folder of them, or a saved
    Hugging Face dataset; empty trains on the built-in chat corpus."""
    format: Literal["auto", "text", "jsonl", "chatterbot", "dailydialog", "hf"] = "auto"
    """How to read data.path: auto picks by file extension and content; hf loads a datasets name or
    save_to_disk folder."""
    chat_template: Literal["default", "litegpt", "tinygpt"] = "default"
    """How conversations become tokens: default (<|user|>...<|end|>), LiteGPT's or TinyGPT's format."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """For dialog data: learn only the assistant's replies, or every token."""
    tokenizer: Literal["char", "gpt2", "bpe", "sentencepiece"] = "char"
    """char: one id per character; gpt2: GPT-2 BPE (tiktoken); bpe / sentencepiece: trained on your corpus."""
    vocab_size: int = 4096
    """Vocabulary size for trained tokenizers (bpe, sentencepiece)."""
    sp_model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece algorithm."""
    gpt2_ranks: str | None = None
    """Local gpt2.tiktoken ranks file for offline use (else $TINYGPT_GPT2_RANKS, else tiktoken downloads)."""
    val_fraction: float = 0.1
    """Share of the corpus (its tail, by position in the input files) held out for validation."""
    suffixes: str = ""
    """Extra file suffixes that count as text in a data folder, comma-separated (e.g. .py,.c); .txt, .md,
    .text and .rst always do, compressed (.gz, .xz, .zst) or not."""
    text_field: str = "text"
    """The text of each record in JSONL, Parquet and Hugging Face datasets."""
    tokenizer_sample: int = 64_000_000
    """Bytes of text that trained tokenizers (bpe, sentencepiece) learn from: whole documents drawn at
    random (seeded) when the corpus is larger, so memory stays bounded."""
    on_error: Literal["error", "skip"] = "error"
    """A document that cannot be read (binary, invalid UTF-8, a JSONL line that is not JSON or lacks the
    field): stop with its file and position, or skip it and count it."""
    workers: int = 0
    """Processes that tokenize in parallel; 0 means one per CPU core."""
    chunk_bytes: int = 4_000_000
    """Text is read and tokenized in pieces of about this size (cut at line starts), so memory does not
    grow with the corpus."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file of a prepared dataset; a killed prepare continues from its last whole shard."""


@dataclass
class TrainConfig:
    """The optimisation schedule and run bookkeeping."""

    max_iters: int = 1000
    """Optimizer steps to train for (ignored when epochs or time_budget is set)."""
    epochs: float | None = None
    """Train for this many passes over the training windows instead of max_iters."""
    time_budget: float | None = None
    """Seconds of training: throughput is measured in the first steps and the schedule is fitted so that it
    ends (decay included) when the budget does. Overrides max_iters and epochs."""
    batch_size: int = 16
    """Sequences per micro-batch, or auto: on a GPU (CUDA or MPS) the largest micro-batch that fits its
    memory, up to the global batch (batch_size x grad_accum from the preset or config file), with grad_accum
    raised to keep that global batch; on a CPU auto keeps the configured batch. Chosen once, when the run is
    created, and saved in its config.yaml."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    auto_batch: bool = False
    """Set by `--train.batch_size auto` (see batch_size); false again in the saved config once chosen."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay (cosine or wsd)."""
    warmup_iters: int = 100
    """Linear warm-up steps."""
    lr_decay_iters: int | None = None
    """Step at which the decay reaches min_lr; empty means the end of training."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """Learning-rate shape after warm-up: cosine decay, or warmup-stable-decay (flat, then a linear decay
    over the last decay_fraction of training; Hu et al. 2024)."""
    decay_fraction: float = 0.2
    """wsd: share of training spent decaying."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw for every parameter, or muon: Muon (orthogonalised momentum; Jordan et al. 2024) for the weight
    matrices inside the blocks and AdamW for embeddings, head, norms and biases, at the same lr and
    schedule."""
    weight_decay: float = 0.1
    """Weight decay (applied to matrices only, not to norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    eval_interval: int = 250
    """Evaluate train and val loss every this many steps."""
    eval_iters: int = 20
    """Batches per periodic evaluation (the final evaluation: see final_eval_tokens)."""
    final_eval_tokens: int | None = 2_000_000
    """The final evaluation scores the whole val split up to this many tokens, and beyond it windows spread
    evenly through the split that hold about this many (on a corpus of gigabytes the whole split would take
    hours); empty means the whole split however large."""
    checkpoint_interval: int = 500
    """Write the 'last' checkpoint every this many steps (and always at the end)."""
    patience: int = 0
    """Stop after this many evaluations without a better val loss; 0 never stops early."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model: some 30-60 s of start-up, then faster steps; falls back to eager mode, with a
    notice, where compiling fails. auto: on for CUDA, where it pays most, off on CPU (from no gain to 1.35x
    measured on 2 cores, not worth the wait for a short run) and on MPS (where it is least mature)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (less memory, more
    compute)."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss or gradient is NaN/inf instead of stopping the run."""
    seed: int = 1337
    """Seeds model init, data order and dropout."""
    init_from: str | None = None
    """Start from these weights instead of a random init: a tinygpt run directory (or checkpoint folder), or a
    local Hugging Face GPT-2 folder. The architecture (every model.* setting but dropout) and the tokenizer
    come from it; conversations add their chat markers to the tokenizer as new rows."""
    device: str = "auto"
    """'auto' (cuda if present, then Apple's mps, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast compute type (weights and optimizer stay float32). auto: bfloat16 on CUDA GPUs that compute
    it natively (compute capability 8.0+: A100, H100, RTX 30xx and later) and on CPUs with AVX512-BF16 or
    AMX; float16 with dynamic loss scaling on older CUDA GPUs (T4, V100); float32 elsewhere, MPS included.
    float16 forces loss scaling anywhere (CPU too); the steps it skips for overflowing gradients are counted
    in the log and metrics."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp keeps a whole copy of the model on every process and averages gradients; fsdp
    (FSDP2) shards weights, gradients and optimizer state over the processes, for models that do not fit
    one."""
    dist_timeout: float = 600.0
    """Under torchrun: seconds a process waits for the others at a collective before it gives up (a crashed
    peer)."""
    log: str = ""
    """Also send the metrics to: a comma-separated subset of tensorboard (files in RUN/tensorboard) and wandb
    (offline into RUN/wandb unless WANDB_MODE or WANDB_API_KEY is set); metrics.jsonl is always written."""


@dataclass
class SampleConfig:
    """Defaults for ``tinygpt sample``."""

    max_new_tokens: int = 200
    """Tokens to generate per sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = 200
    """Keep only the k most likely tokens; empty disables."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens with this much probability; empty disables."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_NEW_TOKENS = 1_000_000  # past this a typo, not a wish: generation would run for hours


@dataclass(frozen=True)
class Range:
    """The values a setting may take: low to high (None: no upper end), low itself excluded with open_low."""

    low: int
    high: int | None = None
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:,}"
        return f"{'(' if self.open_low else '['}{self.low:,}, {self.high:,}]"


# The one rule for sampling settings, wherever they come from: the command line, a config file, the Python API
# (validate) and `tinygpt serve`'s requests (serve.schema builds its fields from this table). temperature and
# top_p take OpenAI's bounds, and the command line shares them instead of allowing more, so settings that work
# in one place work in every other: above 2 a temperature flattens the distribution towards uniform noise, and
# top_p 0 would keep no mass at all.
SAMPLE_RANGES = {"max_new_tokens": Range(1, MAX_NEW_TOKENS), "temperature": Range(0, 2), "top_k": Range(1),
                 "top_p": Range(0, 1, open_low=True)}
SECTIONS: dict[str, type] = {f.name: f.default_factory
                             for f in dataclasses.fields(Config)}  # type: ignore[misc]




# ---------------------------------------------------------------- field types


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _choices(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _word_or(tp: Any) -> tuple[tuple[Any, ...], Any] | None:
    """For a type such as `bool | Literal["auto"]`: (the words, the other type); None for any other type."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    words = [a for a in typing.get_args(tp) if _choices(a)]
    others = [a for a in typing.get_args(tp) if not _choices(a)]
    return (_choices(words[0]), others[0]) if len(words) == 1 and len(others) == 1 else None


def type_name(tp: Any) -> str:
    if (either := _word_or(tp)) is not None:
        return f"{type_name(either[1])}|{'|'.join(either[0])}"
    base, optional = _unwrap_optional(tp)
    choices = _choices(base)
    name = "|".join(map(str, choices)) if choices else base.__name__
    return f"{name} (optional)" if optional else name


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a UsageError naming the key."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise UsageError(f"{key} cannot be empty: give a {type_name(tp)}")
    if (either := _word_or(base)) is not None:
        words, other = either
        if isinstance(value, str) and value.lower() in words:
            return value.lower()
        try:
            return coerce(value, other, key)
        except UsageError:
            raise UsageError(f"{key}={value!r} is not a valid {type_name(tp)}") from None
    choices = _choices(base)
    if choices:
        if value not in choices:
            raise UsageError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0",
                                                            "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value, 0)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except ValueError:
        pass
    else:
        raise AssertionError(f"unsupported config type {base!r} for {key}")
    raise UsageError(f"{key}={value!r} is not a valid {type_name(tp)}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass: its help text."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def iter_fields() -> typing.Iterator[tuple[str, dataclasses.Field, Any, str]]:
    """(dotted key, field, type, help) for every leaf of Config."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f, hints[f.name], docs.get(f.name, "")


# ---------------------------------------------------------------- building a config


def flatten(overrides: Any, source: str) -> dict[str, Any]:
    """A nested ({'model': {'n_layer': 4}}) or dotted ({'model.n_layer': 4}) mapping as dotted keys,
    with unknown sections and keys refused (values are coerced later, by apply_overrides)."""
    if not isinstance(overrides, dict):
        raise UsageError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got "
                         f"{type(overrides).__name__}")
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        section, _, name = str(key).partition(".")
        if section not in SECTIONS:
            raise UsageError(f"{source}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
        items = {name: value}.items() if name else value.items() if isinstance(value, dict) else None
        if items is None:
            raise UsageError(f"{source}: section {section!r} must be a mapping of fields")
        known = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for fname, fvalue in items:
            if fname not in known:
                raise UsageError(f"{source}: unknown config key '{section}.{fname}' (known in {section}: "
                                 f"{', '.join(known)})")
            flat[f"{section}.{fname}"] = fvalue
    return flat


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> None:
    """Apply a nested or dotted mapping in place, each value coerced to its field's type."""
    for key, value in flatten(overrides, source).items():
        section, name = key.split(".")
        sub = getattr(cfg, section)
        setattr(sub, name, coerce(value, typing.get_type_hints(type(sub))[name], key))


# How long to train: train.max_iters, or train.epochs, or train.time_budget (which wins when several are set).
LENGTH_KEYS = ("train.max_iters", "train.epochs", "train.time_budget")
# The model size model.auto_size chooses.
SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd")


def apply_layer(cfg: Config, overrides: dict[str, Any], source: str) -> set[str]:
    """apply_overrides for one layer of settings (a preset, a YAML file, the flags), returning the keys it
    gave.
    A layer that says how long to train replaces the earlier layers' length, whichever kind it was (without
    this, `--train.max_iters 20` on a preset that trains by epochs was silently ignored); within one layer
    time_budget wins over epochs, and epochs over max_iters."""
    flat = flatten(overrides, source)
    if str(flat.get("train.batch_size")).lower() == "auto":
        # the batch of the layers below stays, as the global batch that auto-sizing keeps
        del flat["train.batch_size"]
        flat["train.auto_batch"] = True
    apply_overrides(cfg, flat, source)
    if any(k in flat for k in LENGTH_KEYS):
        # max_iters always has a value; it counts when these are empty
        for key in ("train.epochs", "train.time_budget"):
            if key not in flat:
                setattr(cfg.train, key.split(".")[1], None)
    return set(flat)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = yaml_error_line(e)
        where = f" (line {line})" if line else ""
        raise UsageError(f"config file {p} is not valid YAML{where}: {str(e).splitlines()[0]}") from None
    return data or {}


def yaml_error_line(e: Exception) -> int | None:
    """The 1-based line a YAML error points at, when it knows."""
    mark = getattr(e, "problem_mark", None)
    return mark.line + 1 if mark is not None else None


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            flags: dict[str, Any] | None = None) -> Config:
    """defaults -> preset (DEFAULT_PRESET when none is named) -> YAML file -> dotted flags, then validate.

    A time budget with no model size from the file or the flags turns model.auto_size on: a preset's size
    is rarely the one that learns most in a given time (on the 120 s Tiny Shakespeare run, auto_size
    measured val 1.544-1.555 against 1.652-1.663 for the preset's size). `--model.auto_size false` or an
    explicit n_layer/n_head/n_embd keeps the preset's size."""
    cfg = Config()
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (available: {', '.join(PRESETS)})")
    apply_layer(cfg, PRESETS[preset].overrides, f"preset {preset}")
    given: set[str] = set()
    if config_file is not None:
        given |= apply_layer(cfg, load_yaml(config_file), str(config_file))
    if flags:
        given |= apply_layer(cfg, flags, "command line")
    architecture = sorted(k for k in given if k.startswith("model.") and k != "model.dropout")
    if cfg.train.init_from and architecture:
        raise UsageError(f"--init-from takes the architecture from its source, so {', '.join(architecture)} "
                         "cannot be set with it (model.dropout can)")
    if cfg.train.time_budget is not None and not given & {"model.auto_size",
                                                          *SHAPE_KEYS} and not cfg.train.init_from:
        cfg.model.auto_size = True
    validate(cfg)
    return cfg


def from_dict(saved: dict[str, Any]) -> Config:
    """Rebuild a saved (fully resolved) config."""
    cfg = Config()
    apply_overrides(cfg, saved, "saved config")
    validate(cfg)
    return cfg


def sample_settings(sampling: SampleConfig, settings: dict[str, Any],
                    source: str = "sampling settings") -> None:
    """Set SampleConfig fields by name (max_new_tokens=20, temperature=0, ...) in place, coerced and checked
    as every config value is (within SAMPLE_RANGES): one gate for the command line, the Python API and HTTP
    requests."""
    cfg = Config(sample=sampling)
    apply_overrides(cfg, {"sample": settings}, source)
    validate(cfg)


def validate(cfg: Config) -> None:
    m, data, t, s = cfg.model, cfg.data, cfg.train, cfg.sample
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "data.vocab_size": data.vocab_size,
        "data.tokenizer_sample": data.tokenizer_sample, "data.chunk_bytes": data.chunk_bytes,
        "data.shard_tokens": data.shard_tokens,
        "train.max_iters": t.max_iters, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "train.eval_interval": t.eval_interval, "train.eval_iters": t.eval_iters,
        "train.checkpoint_interval": t.checkpoint_interval,
    }
    optional_positive = {"model.vocab_size": m.vocab_size, "model.mlp_hidden": m.mlp_hidden,
                         "train.lr_decay_iters": t.lr_decay_iters, "train.epochs": t.epochs,
                         "train.final_eval_tokens": t.final_eval_tokens,
                         "train.time_budget": t.time_budget}
    positive.update({k: v for k, v in optional_positive.items() if v is not None})
    for key, value in positive.items():
        if value <= 0:
            raise UsageError(f"{key} must be positive, got {value}")
    non_negative = {"model.dropout": m.dropout, "train.lr": t.lr, "train.min_lr": t.min_lr,
                    "train.warmup_iters": t.warmup_iters, "train.weight_decay": t.weight_decay,
                    "train.grad_clip": t.grad_clip, "train.patience": t.patience}
    for key, value in non_negative.items():
        if value < 0:
            raise UsageError(f"{key} must not be negative, got {value}")
    if m.auto_size and t.time_budget is None:
        raise UsageError("model.auto_size needs train.time_budget: the size is chosen for a time budget")
    if m.n_embd % m.n_head:
        raise UsageError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.pos == "rope" and (m.n_embd // m.n_head) % 2:
        raise UsageError(f"rope needs an even head size, got n_embd/n_head = {m.n_embd // m.n_head}")
    if not 0 <= m.dropout < 1:
        raise UsageError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if data.workers < 0:
        raise UsageError(f"data.workers must be 0 (one per core) or more, got {data.workers}")
    if not 0 < data.val_fraction < 1:
        raise UsageError(f"data.val_fraction must be between 0 and 1 (exclusive), got {data.val_fraction}")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        raise UsageError(f"train.beta1 and train.beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
    if not 0 < t.decay_fraction <= 1:
        raise UsageError(f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
    for name, allowed in SAMPLE_RANGES.items():
        value = getattr(s, name)
        if value is not None and value not in allowed:
            raise UsageError(f"sample.{name} must be in {allowed}, got {value:,}")
    log_targets(t.log)


LOG_TARGETS = ("tensorboard", "wandb")


def log_targets(value: str) -> list[str]:
    """train.log as a list of names, refusing an unknown one."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOG_TARGETS]
    if unknown:
        raise UsageError(f"train.log: unknown {', '.join(unknown)}; choose from {', '.join(LOG_TARGETS)} "
                         "(comma-separated)")
    return names


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
