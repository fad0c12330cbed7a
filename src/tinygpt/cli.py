"""The ``tinygpt`` command: a thin layer over the library.

Every failure a user can cause ends as one line on stderr and a non-zero exit
code (2 for usage errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tinygpt import checkpoint, config, data
from tinygpt.errors import TinyGPTError, UsageError

EXAMPLES = """examples:
  tinygpt train                                    # built-in corpus, a few minutes on a laptop CPU
  tinygpt train --data notes.txt --out runs/notes  # your own text file (or a folder of .txt/.md files)
  tinygpt train --data ../shared/data/tinyshakespeare.txt --tokenizer char --preset cpu-tiny --out runs/shakespeare-char
  tinygpt train --out runs/notes --resume --train.max_iters 4000
  tinygpt sample --run runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 200
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits 2; we want our one-line form
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # keeps a live progress bar intact


# ---------------------------------------------------------------- train

def presets_help() -> str:
    lines = ["presets (--preset NAME):"]
    for name, p in config.PRESETS.items():
        lines.append(f"  {name}: {p.description}")
    return "\n".join(lines)


def train_parser(defaults: config.Config, preset: str | None) -> ArgumentParser:
    header = f"preset {preset}: {config.PRESETS[preset].description}\n\n" if preset in config.PRESETS else ""
    p = ArgumentParser(
        prog="tinygpt train", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description=header + "Train a GPT on a text file, a folder of text files, or the built-in corpus.\n"
        "Config layers apply in order: defaults, --preset, --config FILE.yaml, dotted flags.",
        epilog=presets_help() + "\n\n" + EXAMPLES)
    p.add_argument("--data", dest="data.path", default=argparse.SUPPRESS, metavar="PATH",
                   help="text file or folder of text files (same as --data.path); omit for the built-in corpus")
    p.add_argument("--tokenizer", dest="data.tokenizer", default=argparse.SUPPRESS,
                   choices=["char", "gpt2", "bpe", "sentencepiece"], help="same as --data.tokenizer")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--preset", choices=list(config.PRESETS), help="start from a named recipe (listed below)")
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
                group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar=config.type_name(tp).split(" ")[0],
                                   help=f"{doc} (default: {'empty' if current is None else current})")
    return p


def parse_train(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:  # show the preset's and file's values as defaults in --help
        shown = config.resolve(known.preset, known.config)
    except UsageError:
        shown = config.Config()
    args = train_parser(shown, known.preset).parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if "." in k}
    return args, flags


def cmd_train(argv: list[str]) -> int:
    from tinygpt.device import resolve_device
    from tinygpt.train import train

    args, flags = parse_train(argv)
    run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if args.resume:
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other; pick one")
        if not run_dir.is_dir():
            raise UsageError(f"cannot resume: run directory {run_dir} does not exist")
        found = checkpoint.valid_checkpoints(run_dir, warn=log)
        ckpt = checkpoint.newest(run_dir) if found else None
        if ckpt is None and not (run_dir / "config.yaml").is_file():
            raise UsageError(f"cannot resume: {run_dir} holds no checkpoint and no config.yaml (it never got "
                             "as far as training); start it again with --overwrite")
        if ckpt is None:
            log(f"{run_dir} has no checkpoint yet: starting it from step 0 with its saved config")
        cfg = config.from_dict(config.load_yaml((ckpt or run_dir) / "config.yaml"))
        saved = cfg.to_dict()
        config.apply_overrides(cfg, flags, "command line")
        config.validate(cfg)
        # Repeating the original command with --resume is fine; changing the model or data is not.
        now = cfg.to_dict()
        changed = [k for k in flags if (not k.startswith(("train.", "sample.")) or k == "train.optimizer")
                   and saved[k.split(".")[0]][k.split(".")[1]] != now[k.split(".")[0]][k.split(".")[1]]]
        if changed or args.preset or args.config:
            raise UsageError("on --resume only train.* (but not train.optimizer) and sample.* settings may change; "
                             f"start a new run to change {', '.join(changed) or 'the preset or config file'}")
        train(cfg, run_dir, data.load_prepared(run_dir / "data"), resume_from=ckpt, log=log)
        return 0

    cfg = config.resolve(args.preset, args.config, flags)
    if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
        raise UsageError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    # Everything that can fail on bad input happens before the run directory is touched.
    ds = data.load(cfg, log=log)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = ds.tokenizer.vocab_size
    elif cfg.model.vocab_size < ds.tokenizer.vocab_size:
        raise UsageError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{ds.tokenizer.vocab_size} ids; leave it empty to take it from the tokenizer")
    data.check_length(ds, cfg.model.block_size)
    resolve_device(cfg.train.device)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    ds = data.copy_to(ds, run_dir / "data")
    config.save(cfg, run_dir / "config.yaml")
    log(f"run directory: {run_dir}")
    train(cfg, run_dir, ds, log=log)
    log(f"done. Sample with: tinygpt sample --run {run_dir}")
    return 0


# ---------------------------------------------------------------- sample, chat, eval

def run_parser(prog: str, description: str) -> ArgumentParser:
    """Options shared by the commands that load a trained run."""
    p = ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    p.add_argument("--run", type=Path, required=True, help="run directory written by `tinygpt train`")
    p.add_argument("--checkpoint", default="last", choices=["best", "last"],
                   help="last: the end of training (default); best: the lowest val loss seen")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def add_sampling_flags(p: ArgumentParser, temperature_help: str) -> None:
    p.add_argument("--max-new-tokens", dest="sample.max_new_tokens", default=argparse.SUPPRESS, help="tokens per reply/sample")
    p.add_argument("--temperature", dest="sample.temperature", default=argparse.SUPPRESS, help=temperature_help)
    p.add_argument("--top-k", dest="sample.top_k", default=argparse.SUPPRESS, help="keep the k most likely tokens")
    p.add_argument("--top-p", dest="sample.top_p", default=argparse.SUPPRESS, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def load_run(args: argparse.Namespace, sampling: dict[str, Any] | None = None) -> checkpoint.Loaded:
    from tinygpt.device import resolve_device

    loaded = checkpoint.load(checkpoint.find(args.run, args.checkpoint, warn=log), resolve_device(args.device))
    overrides = {k: v for k, v in vars(args).items() if k.startswith("sample.")}
    config.apply_overrides(loaded.config, {**(sampling or {}), **overrides}, "command line")
    config.validate(loaded.config)
    log(f"loaded {loaded.path} (step {loaded.state.get('progress', {}).get('step', '?')})")
    return loaded


def seeded_generator(loaded: checkpoint.Loaded, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=next(loaded.model.parameters()).device)
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


def cmd_sample(argv: list[str]) -> int:
    from tinygpt.generate import stream_text

    p = run_parser("tinygpt sample", "Generate text from a trained run, streamed to stdout.")
    p.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples (default: 1)")
    add_sampling_flags(p, "0 is greedy (default: the run's sample.temperature)")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    loaded = load_run(args)
    s, tok = loaded.config.sample, loaded.tokenizer
    prompt_ids = tok.encode(args.prompt, allow_special=True) if args.prompt else [tok.eot_id]
    if len(prompt_ids) > loaded.config.model.block_size:
        log(f"note: the prompt has {len(prompt_ids)} tokens; only the most recent {loaded.config.model.block_size} "
            "(the context window) are seen")
    generator = seeded_generator(loaded, args.seed)
    for i in range(args.num_samples):
        if i:
            print("\n---------------")
        print(args.prompt, end="", flush=True)
        for piece in stream_text(loaded.model, tok, prompt_ids, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                 generator=generator):
            print(piece, end="", flush=True)
        print()
    return 0


def chat_template_of(loaded: checkpoint.Loaded):
    from tinygpt.chat import TEMPLATES

    template = TEMPLATES[loaded.config.data.chat_template]
    if not set(template.specials) <= set(loaded.tokenizer.special_tokens):
        raise TinyGPTError(f"{run_dir_of(loaded)} was trained on plain text, not conversations; chat needs a run "
                           "trained on dialog data (e.g. `tinygpt train` with no --data, or a .jsonl file)")
    return template


def run_dir_of(loaded: checkpoint.Loaded) -> Path:
    return loaded.path.parent.parent


def cmd_chat(argv: list[str]) -> int:
    from tinygpt.chat import ChatSession, console

    p = run_parser("tinygpt chat", "Talk to a trained chat model. Interactive on a terminal; with piped input, "
                   "one reply line per input line.")
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    add_sampling_flags(p, "0 (the default) is greedy, which suits small models best")
    args = p.parse_args(argv)
    loaded = load_run(args, sampling={"sample.temperature": 0.0, "sample.max_new_tokens": 128})
    s = loaded.config.sample
    session = ChatSession(loaded.model, loaded.tokenizer, chat_template_of(loaded), s.max_new_tokens, s.temperature,
                          s.top_k, s.top_p, system=args.system, generator=seeded_generator(loaded, args.seed))
    console(session, sys.stdin, interactive=sys.stdin.isatty())
    return 0


def cmd_eval(argv: list[str]) -> int:
    import json

    from tinygpt import evaluate
    from tinygpt.device import resolve_device

    p = run_parser("tinygpt eval", "Report loss, perplexity and bits per byte on the run's val split (or --data); "
                   "for chat models also BLEU on held-out conversations and skill accuracy.")
    p.add_argument("--data", default=None, help="evaluate on this file or folder instead of the run's val split")
    p.add_argument("--limit", type=int, default=200, help="conversations/prompts scored per chat metric (default: 200)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    loaded = load_run(args)
    cfg, tok = loaded.config, loaded.tokenizer
    device = resolve_device(args.device)
    if args.data:  # the whole of the given data, encoded with the run's tokenizer
        cfg.data.path, cfg.data.format = args.data, "auto"
        ds = data.load(cfg, log=log, tokenizer=tok)
        splits, convs = [ds.train, ds.val], ds.conversations("train") + ds.conversations("val")
    else:
        ds = data.load_prepared(run_dir_of(loaded) / "data")
        splits, convs = [ds.val], ds.conversations("val")
    total = evaluate.LossSum()
    for split in splits:
        total += evaluate.split_loss(loaded.model, split, args.batch_size, device, packed=ds.packed, tokenizer=tok)
    result: dict[str, Any] = {"run": str(run_dir_of(loaded)), "checkpoint": str(loaded.path),
                              "step": loaded.state.get("progress", {}).get("step"), **evaluate.loss_metrics(total)}
    if ds.packed:
        result.update(evaluate.chat_metrics(loaded.model, tok, cfg.data.chat_template, ds.conversations("train"),
                                            convs, builtin=ds.meta.get("builtin", False) and not args.data,
                                            limit=args.limit))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    return 0


# ---------------------------------------------------------------- entry point

COMMANDS = {"train": cmd_train, "sample": cmd_sample, "chat": cmd_chat, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tinygpt {train,sample,chat,eval} ...\n\n"
              "  train    train a GPT on your text or conversations (or the built-in chat corpus)\n"
              "  sample   generate text from a trained run\n"
              "  chat     talk to a run trained on conversations\n"
              "  eval     loss, perplexity, bits per byte; BLEU and skill accuracy for chat runs\n\n"
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
