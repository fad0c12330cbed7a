"""The ``tinygpt`` command: a thin layer over the library.

Every failure a user can cause ends as one line on stderr and a non-zero exit
code (2 for usage errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tinygpt import config, presets, rundir
from tinygpt import run as tinygpt_run
from tinygpt.checkpoint import Checkpoint
from tinygpt.config import SAMPLE_RANGES, sample_settings
from tinygpt.data.prepare import prepare_dataset
from tinygpt.errors import Interrupted, TinyGPTError, UsageError
from tinygpt.evaluate import evaluate_run
from tinygpt.export import gguf as gguf_export
from tinygpt.export import hf as hf_export
from tinygpt.infer.chat import CHAT_SAMPLING, ChatSession, console
from tinygpt.infer.decoder import sample_texts
from tinygpt.infer.generate import prompt_ids, seeded_generator
from tinygpt.infer.quantize import DTYPES
from tinygpt.report.records import benchmark_rows
from tinygpt.serve.settings import ServeConfig
from tinygpt.train import distributed

EXAMPLES = """examples:
  tinygpt train                                    # built-in corpus, a few minutes on a laptop CPU
  tinygpt train --data notes.txt --out runs/notes  # your own text file (or a folder of .txt/.md files)
  tinygpt train --data data/tinyshakespeare.txt --tokenizer char --preset cpu-tiny \
--out runs/shakespeare-char
  tinygpt train --out runs/notes --resume --train.max_iters 4000
  tinygpt sample --run runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 200
  tinygpt serve --run runs/demo                    # chat page at http://127.0.0.1:8000/, OpenAI API at /v1
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits 2; we want our one-line form
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # keeps a live progress bar intact


# ---------------------------------------------------------------- train

def presets_help() -> str:
    lines = ["presets (--preset NAME):"]
    for name, p in presets.PRESETS.items():
        lines.append(f"  {name}: {p.description}")
    return "\n".join(lines)


def train_parser(defaults: config.Config, preset: str | None) -> ArgumentParser:
    header = (f"preset {preset}: {presets.PRESETS[preset].description}\n\n" if preset in presets.PRESETS
              else "")
    p = ArgumentParser(
        prog="tinygpt train", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description=header + "Train a GPT on a text file, a folder of text files, or the built-in corpus.\n"
        "Config layers apply in order: defaults, --preset, --config FILE.yaml, dotted flags.",
        epilog=presets_help() + "\n\n" + EXAMPLES)
    p.add_argument("--data", dest="data.path", default=argparse.SUPPRESS, metavar="PATH",
                   help="text file or folder of text files (same as --data.path); omit for the built-in "
                   "corpus")
    p.add_argument("--tokenizer", dest="data.tokenizer", default=argparse.SUPPRESS,
                   choices=["char", "gpt2", "bpe", "sentencepiece"], help="same as --data.tokenizer")
    p.add_argument("--init-from", dest="train.init_from", default=argparse.SUPPRESS, metavar="SOURCE",
                   help="start from these weights: a tinygpt run, or a local Hugging Face GPT-2 folder "
                   "(same as --train.init_from)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--preset", choices=list(presets.PRESETS), help="start from a named recipe (listed below)")
    p.add_argument("--config", metavar="FILE", help="YAML file with sections model/data/train/sample")
    p.add_argument("--resume", action="store_true", help="continue the newest valid checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    values = defaults.to_dict()
    for section, cls in config.SECTIONS.items():
        group = p.add_argument_group(f"{section} ({cls.__doc__.strip()})" if cls.__doc__ else section)
        for key, _, tp, doc in config.iter_fields():
            if key.startswith(section + "."):
                current = values[section][key.split(".", 1)[1]]
                group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS,
                                   metavar=config.type_name(tp).split(" ")[0],
                                   help=f"{doc} (default: {'empty' if current is None else current})")
    return p


def parse_train(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    shown = config.Config()
    if known.help:  # the preset's and the file's values, shown as the defaults in --help
        try:
            shown = config.resolve(known.preset, known.config)
        except UsageError:
            pass
    args = train_parser(shown, known.preset).parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if "." in k}
    return args, flags


def cmd_train(argv: list[str]) -> int:
    args, flags = parse_train(argv)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR: the run directory to continue")
    dist = distributed.from_env()  # torchrun's processes, if any
    if args.resume:  # the config is the saved one with the command's changes: resume resolves it
        # Resuming prepares no data: the others wait for process 0 as long as a collective would by default.
        setup_timeout = config.TrainConfig.dist_timeout
        make = functools.partial(tinygpt_run.resume, args.out, flags, args.preset, args.config, log=log)
    else:
        cfg = config.resolve(args.preset, args.config, flags)
        setup_timeout = cfg.train.dist_timeout
        make = functools.partial(tinygpt_run.create, cfg, args.out, args.overwrite, log=log,
                                 preset=args.preset)
    try:
        run = tinygpt_run.shared(make, dist, setup_timeout)
        run.train(log=log, dist=dist)
    finally:
        distributed.shutdown(dist)
    if dist.main:
        log(f"done. Next:\n  tinygpt sample --run {run.dir}\n  tinygpt report {run.dir}   # loss curves, "
            "figures and samples")
    return 0


# ---------------------------------------------------------------- prepare

PREPARE_EXAMPLES = """examples:
  tinygpt prepare --data corpus/ --tokenizer gpt2 --out prepared/corpus  # then train --data prepared/corpus
  tinygpt prepare --data code/ --data.suffixes .py,.c --tokenizer bpe --out prepared/code
  tinygpt prepare --data docs.jsonl.gz --data.text_field body --tokenizer gpt2 --out prepared/docs
  tinygpt prepare --data fineweb10B/ --tokenizer gpt2 --out prepared/fineweb  # llm.c shards, as they are
"""


def cmd_prepare(argv: list[str]) -> int:
    p = ArgumentParser(prog="tinygpt prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False, epilog=PREPARE_EXAMPLES,
                       description="Tokenize a corpus of any size into a prepared dataset folder\n"
                       "(tokenizer, token shards, meta.json) in bounded memory, on every core: text\n"
                       "files and folders (also .gz/.xz/.zst), JSONL and Parquet with a text field,\n"
                       "Hugging Face save_to_disk folders, conversations, nanoGPT train.bin/val.bin and\n"
                       "llm.c shards. Run it again after a kill to continue from the last whole shard.")
    p.add_argument("--data", dest="data.path", required=True, metavar="PATH", help="the corpus")
    p.add_argument("--tokenizer", dest="data.tokenizer", default=argparse.SUPPRESS,
                   choices=["char", "gpt2", "bpe", "sentencepiece"], help="same as --data.tokenizer")
    p.add_argument("--out", type=Path, required=True, help="the prepared dataset folder to write")
    p.add_argument("--workers", dest="data.workers", default=argparse.SUPPRESS, type=int, metavar="N",
                   help="tokenizing processes (default: one per CPU core)")
    p.add_argument("--preset", choices=list(presets.PRESETS),
                   help="take the data settings (tokenizer, vocabulary) of a preset (default: modern's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    group = p.add_argument_group("data (how the corpus is read and tokenized)")
    for key, _, tp, doc in config.iter_fields():
        if key.startswith("data.") and key not in ("data.path", "data.tokenizer", "data.workers"):
            group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS,
                               metavar=config.type_name(tp).split(" ")[0], help=doc)
    args = p.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if "." in k}
    cfg = config.resolve(args.preset, None, flags)  # the tokenizer `tinygpt train --data PATH` would use
    ds = prepare_dataset(cfg, args.out, args.overwrite, log)
    sizes = f"{ds.meta.get('train_tokens', 0):,} train / {ds.meta.get('val_tokens', 0):,} val tokens"
    log(f"prepared {args.out}: {sizes}. Next:\n  tinygpt train --data {args.out}")
    return 0


# ---------------------------------------------------------------- sample, chat, eval

def run_parser(prog: str, description: str, dtype: str = "auto") -> ArgumentParser:
    """Options shared by the commands that load a trained run."""
    p = ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    p.add_argument("--run", type=Path, required=True, help="run directory written by `tinygpt train`")
    p.add_argument("--checkpoint", default="last", choices=["best", "last"],
                   help="last: the end of training (default); best: the lowest val loss seen")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=dtype, choices=["auto", *DTYPES],
                   help="weights for decoding: float32 (exact), bfloat16, or int8 (a quarter of the bytes; "
                   "faster on CPUs with native bf16); auto: int8 where a one-time probe finds it faster here "
                   f"and it moves the run's val perplexity by under 1%%, else float32 (default: {dtype})")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def add_sampling_flags(p: ArgumentParser, temperature_help: str) -> None:
    r = SAMPLE_RANGES  # checked by sample_settings in load_run
    unset = argparse.SUPPRESS
    p.add_argument("--max-new-tokens", default=unset, help=f"tokens per reply/sample: {r['max_new_tokens']}")
    p.add_argument("--temperature", default=unset, help=f"in {r['temperature']}; {temperature_help}")
    p.add_argument("--top-k", default=unset, help=f"keep the k most likely tokens, k {r['top_k']}")
    p.add_argument("--top-p", default=unset, help=f"nucleus sampling mass, in {r['top_p']}")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p")


def load_run(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint the command names, its sampling settings set from `defaults`, then the flags."""
    ckpt = tinygpt_run.load(args.run, args.checkpoint, args.device, warn=log, dtype=args.dtype)
    flags = {k: v for k, v in vars(args).items() if k in SAMPLING_FLAGS}
    sample_settings(ckpt.config.sample, {**(defaults or {}), **flags}, "command line")
    log(f"loaded {ckpt.path} (step {ckpt.step if ckpt.step is not None else '?'})")
    return ckpt


def cmd_sample(argv: list[str]) -> int:
    p = run_parser("tinygpt sample", "Generate text from a trained run, streamed to stdout.")
    p.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="how many samples, decoded together in one batch (default: 1)")
    add_sampling_flags(p, "0 is greedy (default: the run's sample.temperature)")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    ckpt = load_run(args)
    ids = prompt_ids(ckpt.tokenizer, args.prompt)
    if len(ids) > ckpt.config.model.block_size:
        log(f"note: the prompt has {len(ids)} tokens; only the most recent {ckpt.config.model.block_size} "
            "(the context window) are seen")
    generator = seeded_generator(ckpt.model, args.seed)
    print(args.prompt, end="", flush=True)
    # The samples are decoded together in one batch; the first one streams, the others print when done.
    texts = sample_texts(ckpt.model, ckpt.tokenizer, ids, ckpt.config.sample, args.num_samples, generator,
                         on_piece=lambda i, piece: i == 0 and print(piece, end="", flush=True))
    print()
    for text in texts[1:]:
        print("\n---------------")
        print(args.prompt + text)
    return 0


def cmd_chat(argv: list[str]) -> int:
    p = run_parser("tinygpt chat",
                   "Talk to a trained chat model. Interactive on a terminal; with piped input, "
                   "one reply line per input line.")
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    add_sampling_flags(p, "0 (the default) is greedy, which suits small models best")
    args = p.parse_args(argv)
    ckpt = load_run(args, defaults=CHAT_SAMPLING)
    session = ChatSession(ckpt.model, ckpt.tokenizer, tinygpt_run.chat_template(ckpt), ckpt.config.sample,
                          system=args.system, generator=seeded_generator(ckpt.model, args.seed))
    console(session, sys.stdin, interactive=sys.stdin.isatty())
    return 0


def cmd_eval(argv: list[str]) -> int:
    p = run_parser("tinygpt eval",
                   "Report loss, perplexity and bits per byte on the run's val split (or --data); "
                   "for chat models also BLEU on held-out conversations and skill accuracy. With --tasks, "
                   "run lm-evaluation-harness benchmarks (HellaSwag, ARC, LAMBADA, ...) on the run's own "
                   "model and tokenizer instead (pip install 'tinygpt[eval]').", dtype="float32")
    p.add_argument("--data", default=None,
                   help="evaluate on all of this file or folder instead of the run's val split (on a "
                   "`tinygpt prepare` folder: its val split)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy,lambada_openai "
                   "(`lm-eval ls tasks` lists them); results are saved in RUN/eval/")
    p.add_argument("--include-path", default=None,
                   help="a folder of your own task YAML files (with --tasks), e.g. for offline data")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="examples shown before each question (with --tasks; default: the task's own)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap task prompts in the run's chat template (with --tasks; default: on for chat "
                   "runs)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task with --tasks (default: all), else conversations/prompts scored per "
                   "chat metric (default: 200)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per forward pass (default: 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise UsageError("--limit and --batch-size must be at least 1")
    if args.tasks is None:
        for flag in ("include_path", "num_fewshot", "chat_template"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} goes with --tasks")
        result = evaluate_run(load_run(args), args.data, args.batch_size, args.limit or 200, log=log)
        print(json.dumps(result) if args.json else "\n".join(
            f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}" for k, v in result.items()))
        return 0
    return eval_tasks(args)


def eval_tasks(args: argparse.Namespace) -> int:
    from tinygpt import harness  # an extra, imported only when asked for

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or args.data is not None:
        raise UsageError("--tasks needs at least one task name, and takes its data from the tasks, not "
                         "--data")
    if not args.debug:
        harness.quiet_logging()
    harness.task_manager(tuple(tasks), args.include_path)  # unknown names are refused before a model loads
    summary = harness.run_tasks(load_run(args), tasks, args.limit, args.num_fewshot, args.batch_size,
                                args.include_path, args.chat_template, log=log)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{'task':24s} {'metric':16s} {'value':>8s} {'stderr':>8s}")
    for row in benchmark_rows(summary):
        err = row["stderr"]
        print(f"{row['task']:24s} {row['metric']:16s} {row['value']:8.4f} "
              + (f"{err:8.4f}" if isinstance(err, int | float) else ""))
    return 0


def cmd_export(argv: list[str]) -> int:
    p = ArgumentParser(prog="tinygpt export", allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write a trained run in a format other runtimes load, with the same "
                       "logits:\n"
                       "  hf    a folder for Hugging Face transformers (AutoModelForCausalLM, AutoTokenizer; "
                       "no custom code)\n"
                       "  gguf  one file for llama.cpp and Ollama (FROM ./model.gguf in a Modelfile)",
                       epilog="examples:\n  tinygpt export --run runs/demo --format hf --out "
                       "exports/demo-hf\n"
                       "  tinygpt export --run runs/demo --format gguf --dtype q8_0 --out exports/demo.gguf")
    p.add_argument("--run", type=Path, required=True, help="run directory written by `tinygpt train`")
    p.add_argument("--checkpoint", default="last", choices=["best", "last"],
                   help="which checkpoint (default: last)")
    p.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf folder or gguf file")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write (default: RUN/export/hf, or RUN/export/NAME-DTYPE.gguf)")
    p.add_argument("--dtype", default="f32", choices=list(gguf_export.DTYPES),
                   help="gguf weights: f32 (exact), f16, or q8_0 (8-bit, about 4x smaller); default f32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.format == "hf" and args.dtype != "f32":
        raise UsageError("--dtype applies to --format gguf; the hf folder holds float32 weights")
    ckpt = tinygpt_run.load(args.run, args.checkpoint, "cpu", warn=log)
    template = tinygpt_run.trained_template(ckpt)
    if args.format == "hf":
        out = hf_export.export_hf(ckpt, args.out or args.run / rundir.EXPORT / "hf", template, args.overwrite)
    else:
        default = args.run / rundir.EXPORT / f"{args.run.resolve().name}-{args.dtype}.gguf"
        out = gguf_export.export_gguf(ckpt, args.out or default, template, args.dtype, args.overwrite, log)
    log(f"wrote {out} from {ckpt.path} (step {ckpt.step})")
    return 0


def cmd_serve(argv: list[str]) -> int:
    p = run_parser("tinygpt serve",
                   "Serve a trained run over the OpenAI API (/v1/completions, /v1/chat/completions, "
                   "/v1/models), with a chat page at /. Concurrent requests are decoded together in one "
                   "batch.")
    docs = config.field_docs(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        kind = str if f.default is None else type(f.default)
        shown = ("" if "default" in docs[f.name]
                 else f" (default: {'none' if f.default is None else f.default})")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=f.default,
                       metavar=f.name.split("_")[-1].upper(), help=docs[f.name] + shown)
    args = p.parse_args(argv)
    settings = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    settings.validate()
    try:
        from tinygpt.serve import app as serve_app  # the web stack is an extra
    except ImportError as e:
        raise TinyGPTError(f"tinygpt serve needs {e.name}: pip install 'tinygpt[serve]'") from None
    serve_app.serve(load_run(args), settings, log)
    return 0


# ---------------------------------------------------------------- report, runs

def cmd_report(argv: list[str]) -> int:
    p = ArgumentParser(prog="tinygpt report", allow_abbrev=False,
                       description="Plot one run or several overlaid (train and val loss against step, "
                       "tokens and wall time; learning rate; tokens/s), with a table of their final figures, "
                       "the config keys in which they differ and a few samples from each run's last "
                       "checkpoint. Needs matplotlib (pip install 'tinygpt[report]').")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="run directories written by `tinygpt train`")
    p.add_argument("--out", type=Path,
                   help="FILE.png (the plots), FILE.html or FILE.md (a self-contained report "
                   "with the plots embedded); default RUN/report.png for one run, report.png for several")
    p.add_argument("--samples", type=int, default=2,
                   help="samples per run in an HTML or Markdown report (default: 2)")
    p.add_argument("--sample-tokens", type=int, default=120, help="new tokens per sample (default: 120)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.samples < 0 or args.sample_tokens < 1:
        raise UsageError("--samples must not be negative and --sample-tokens must be at least 1")
    from tinygpt.report.document import write_report

    out = args.out or (args.runs[0] / rundir.REPORT if len(args.runs) == 1 else Path(rundir.REPORT))
    write_report(args.runs, out, args.samples, args.sample_tokens, log)
    return 0


def cmd_runs(argv: list[str]) -> int:
    p = ArgumentParser(prog="tinygpt runs", allow_abbrev=False,
                       description="List the run directories under DIR, newest first: name, preset, state "
                       "(running, finished, interrupted and resumable, failed), step of total, best and "
                       "final val loss, age. A run is running exactly while its training process holds its "
                       "lock file.")
    p.add_argument("dir", nargs="?", type=Path, default=Path("runs"),
                   help="folder of run directories (default: runs)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    from tinygpt.report.listing import list_runs, table

    lines = list_runs(args.dir)
    print(table(lines) if lines else f"no runs under {args.dir}")
    return 0


# ---------------------------------------------------------------- entry point

COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "chat": cmd_chat,
            "eval": cmd_eval, "export": cmd_export,
            "serve": cmd_serve, "report": cmd_report, "runs": cmd_runs}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tinygpt {prepare,train,sample,chat,eval,export,serve,report,runs} ...\n\n"
              "  prepare  tokenize a corpus of any size into token shards, on every core\n"
              "  train    train a GPT on your text or conversations (or the built-in chat corpus)\n"
              "  sample   generate text from a trained run\n"
              "  chat     talk to a run trained on conversations\n"
              "  eval     loss, perplexity, bits per byte; BLEU and skill accuracy for chat runs; with "
              "--tasks,\n           benchmarks (HellaSwag, ARC, ...) through lm-evaluation-harness\n"
              "  export   write a run for Hugging Face transformers (hf) or llama.cpp and Ollama (gguf)\n"
              "  serve    an OpenAI-compatible server with a chat page, batching concurrent requests\n"
              "  report   loss curves, final figures and samples of one run or several compared (PNG, HTML, "
              "Markdown)\n"
              "  runs     list the runs under runs/ (or DIR): state, step, val loss, age\n\n"
              "Run `tinygpt COMMAND --help` for a command's options.\n\n" + EXAMPLES)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from tinygpt import __version__
        print(f"tinygpt {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            raise UsageError(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        return command(argv[1:])
    except TinyGPTError as e:
        if debug:
            raise
        # Under torchrun every process meets the same refusal or stop; rank 0 says it for all of them.
        if not (isinstance(e, UsageError | Interrupted) and not distributed.from_env().main):
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tinygpt sample ... | head`
        return 0
    except OSError as e:  # disk full, permission denied, ...: name the file, the reason and the fix
        if debug:
            raise
        fix = {errno.ENOSPC: "free some disk space or choose another --out",
               errno.EACCES: "choose a writable --out", errno.EROFS: "choose a writable --out",
               errno.EPERM: "choose a writable --out"}.get(e.errno or 0, "check the path")
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}; {fix}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
