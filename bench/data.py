"""Preparing a real-sized corpus: time, MB/s and peak memory of `tinygpt prepare` against its peers.

The corpora are built from files every machine has: the Python source of the installed packages
(site-packages), copied as .txt files until the folder holds 40 MB and 200 MB (`--sizes`). Each method
tokenizes the same folder with GPT-2's BPE (tiktoken), in its own process, measured with
`/usr/bin/time`-style figures (wall time, peak RSS of the process and, for pools, its largest child):

- `tinygpt prepare` (streamed, one process per core);
- today's path before #23, reconstructed: every file read into one list of strings, one list of ids;
- nanoGPT's OpenWebText method: Hugging Face `datasets` `map(num_proc=N)` with tiktoken, then the ids
  written into one memmap in batches;
- one thread of tiktoken over the same text, read file by file (the per-core ceiling), no writing: with
  `encode_ordinary`, the call nanoGPT and most scripts make, and with `encode_to_numpy`, tiktoken's fastest
  (no Python list of ids), which prepare's workers call;
- tiktoken's `encode_to_numpy` in one forked process per core, each over its share of the files: the
  machine's ceiling for any pool, since cores that share a VM may not each run at one core's speed.

Imports are not timed (torch's alone takes seconds); peak RSS includes them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import REPO, SHARED_DATA, machine_info, parser, print_table, save_results

RANKS = SHARED_DATA / "gpt2.tiktoken"


def build_corpus(folder: Path, megabytes: int) -> Path:
    """Python files of site-packages copied as .txt until the folder holds `megabytes` MB."""
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    site = Path(sys.prefix) / "lib"  # the venv: torch, transformers, datasets, ...
    size, goal = 0, megabytes * 1_000_000
    for i, f in enumerate(sorted(site.rglob("*.py"))):
        try:
            data = f.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "\x00" in data or not data.strip():
            continue
        (folder / f"{i:07d}.txt").write_text(data)
        size += len(data.encode())
        if size >= goal:
            return folder
    raise SystemExit(f"only {size / 1e6:.0f} MB of Python source under {site}; need {megabytes} MB")


# name: (imports, untimed; the work, timed)
METHODS = {
    "tinygpt prepare": ("from tinygpt.cli import main", """
        main(["prepare", "--data", CORPUS, "--tokenizer", "gpt2", "--data.gpt2_ranks", RANKS, "--out", OUT])
    """),
    "before #23 (in memory)": ("""
        import numpy as np
        from pathlib import Path
        from tinygpt.tokenizer import build_tokenizer
    """, """
        tok = build_tokenizer("gpt2", [], gpt2_ranks=RANKS)
        docs = [f.read_text() for f in sorted(Path(CORPUS).glob("*.txt"))]
        ids = []
        for i, d in enumerate(docs):
            if i:
                ids.append(tok.eot_id)
            ids.extend(tok.encode(d))
        np.asarray(ids, dtype=np.uint16).tofile(OUT + ".bin")
    """),
    "nanoGPT (datasets map)": ("""
        import numpy as np, datasets
        from pathlib import Path
        from tinygpt.tokenizer import GPT2Tokenizer
    """, """
        enc = GPT2Tokenizer.build(RANKS, [])._enc
        files = [str(f) for f in sorted(Path(CORPUS).glob("*.txt"))]
        ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train",
                                   cache_dir=OUT + ".cache")
        def process(example):
            ids = enc.encode_ordinary(example["text"]) + [50256]  # GPT-2's <|endoftext|>
            return {"ids": ids, "len": len(ids)}
        tokenized = ds.map(process, remove_columns=["text"], num_proc=WORKERS)
        n = int(np.sum(tokenized["len"], dtype=np.uint64))
        arr = np.memmap(OUT + ".bin", dtype=np.uint16, mode="w+", shape=(n,))
        at = 0
        for k in range(64):
            batch = tokenized.shard(num_shards=64, index=k, contiguous=True).with_format("numpy")
            chunk = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, np.uint16)
            arr[at: at + len(chunk)] = chunk
            at += len(chunk)
        arr.flush()
    """),
    "tiktoken 1 thread": ("""
        from pathlib import Path
        from tinygpt.tokenizer import GPT2Tokenizer
    """, """
        enc = GPT2Tokenizer.build(RANKS, [])._enc
        n = sum(len(enc.encode_ordinary(f.read_text())) for f in sorted(Path(CORPUS).glob("*.txt")))
    """),
    "tiktoken to_numpy 1 thread": ("""
        from pathlib import Path
        from tinygpt.tokenizer import GPT2Tokenizer
    """, """
        enc = GPT2Tokenizer.build(RANKS, [])._enc
        n = sum(len(enc.encode_to_numpy(f.read_text(), disallowed_special=()))
                for f in sorted(Path(CORPUS).glob("*.txt")))
    """),
    # The machine's ceiling for any pool: tiktoken alone in WORKERS forked processes, each over its share of
    # the files (balanced by bytes), nothing read for another process and nothing written.
    "tiktoken per process": ("""
        import os
        from pathlib import Path
        from tinygpt.tokenizer import GPT2Tokenizer
    """, """
        enc = GPT2Tokenizer.build(RANKS, [])._enc
        files = sorted(Path(CORPUS).glob("*.txt"))
        total, shares, at = sum(f.stat().st_size for f in files), [[] for _ in range(WORKERS)], 0
        for f in files:
            shares[min(WORKERS - 1, at * WORKERS // total)].append(f)
            at += f.stat().st_size
        kids = []
        for share in shares:
            if (pid := os.fork()) == 0:
                sum(len(enc.encode_to_numpy(f.read_text(), disallowed_special=())) for f in share)
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            os.waitpid(pid, 0)
    """),
}

MEASURE = """
import resource, sys, time
CORPUS, RANKS, OUT, WORKERS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
{setup}
began = time.monotonic()
{body}
seconds = time.monotonic() - began
own, kids = (resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print("RESULT", seconds, own, kids)
"""


def measure(name: str, corpus: Path, out: Path, workers: int) -> dict:
    setup, body = METHODS[name]
    code = MEASURE.format(setup=textwrap.dedent(setup), body=textwrap.dedent(body))
    run = subprocess.run([sys.executable, "-c", code, str(corpus), str(RANKS), str(out), str(workers)],
                         capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "src"),
                                                                      "PATH": "/usr/bin:/bin"})
    if run.returncode:
        return {"error": run.stderr.strip().splitlines()[-1]}
    seconds, own, kids = run.stdout.split("RESULT")[-1].split()
    size = sum(f.stat().st_size for f in corpus.glob("*.txt"))
    return {"seconds": float(seconds), "mb_per_s": size / 1e6 / float(seconds),
            "peak_rss_mb": int(own) / 1024, "largest_child_rss_mb": int(kids) / 1024}


def main(argv: list[str] | None = None) -> dict:
    import os

    p = parser(__doc__)
    p.add_argument("--sizes", default="40,200", help="corpus sizes in MB (default 40,200; --quick: 40)")
    p.add_argument("--methods", default=",".join(METHODS), help="which of: " + ", ".join(METHODS))
    p.add_argument("--keep", type=Path, help="build and keep the corpora here (default: a temporary folder)")
    args = p.parse_args(argv)
    if not RANKS.exists():
        print(f"skipped: needs GPT-2's ranks at {RANKS}")
        return {"skipped": f"no {RANKS}"}
    workers = len(os.sched_getaffinity(0))
    root = args.keep or Path(tempfile.mkdtemp(prefix="tinygpt-bench-data-"))
    results: dict = {"machine": machine_info(), "workers": workers, "runs": []}
    headers = ["corpus", "method", "s", "MB/s", "peak RSS MB", "largest child MB"]
    for mb in (int(x) for x in ("40" if args.quick else args.sizes).split(",")):
        corpus = build_corpus(root / f"corpus-{mb}mb", mb)
        for name in args.methods.split(","):
            out = root / f"out-{mb}-{name.split()[0]}"
            r = dict(measure(name, corpus, out, workers), corpus_mb=mb, method=name)
            for extra in root.glob(f"out-{mb}-{name.split()[0]}*"):
                shutil.rmtree(extra, ignore_errors=True) if extra.is_dir() else extra.unlink()
            results["runs"].append(r)
            print_table(headers, [row(r)])
    print_table(headers, [row(r) for r in results["runs"]])
    if not args.no_save:
        save_results("data", results)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return results


def row(r: dict) -> list:
    return [f"{r['corpus_mb']} MB", r["method"], *(f"{r[k]:,.1f}" if k in r else r.get("error", "-")
                                                  for k in ("seconds", "mb_per_s", "peak_rss_mb",
                                                            "largest_child_rss_mb"))]


if __name__ == "__main__":
    main()
