"""Preparing corpora of any size (tinygpt.data.stream, shards, sources) and reading their shards."""

import gzip
import hashlib
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinygpt import config
from tinygpt.data import prepare, shards
from tinygpt.data.batches import Split, TokenStream, windows
from tinygpt.errors import TinyGPTError

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"
needs_ranks = pytest.mark.skipif(not RANKS.exists(), reason=f"GPT-2 ranks file {RANKS} not present")
WORDS = "alpha beta gamma delta caf\u00e9 zeta eta theta iota kappa lambda mu".split()


def docs(n=12, lines=40, seed=0):
    rng = np.random.default_rng(seed)
    return ["\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(lines)) + "\n" for _ in range(n)]


def prepared(path, out=None, **data):
    flags = {"data.path": str(path), **{f"data.{k}": v for k, v in data.items()}}
    cfg = config.resolve("cpu-tiny", flags=flags)
    quiet = lambda m: None  # noqa: E731
    return prepare.prepare_dataset(cfg, out, log=quiet) if out else prepare.prepare(cfg, log=quiet)


def stream_of(ds):
    """Every token of both splits, end-of-text ids removed: where the split falls differs between formats."""
    both = np.concatenate([np.asarray(ds.train.tokens[np.arange(len(ds.train.tokens))]),
                           np.asarray(ds.val.tokens[np.arange(len(ds.val.tokens))])])
    return both[both != ds.tokenizer.eot_id]


def digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*_*.bin"))}


@pytest.mark.parametrize("tokenizer", ["char", "bpe", pytest.param("gpt2", marks=needs_ranks)])
def test_tiny_shakespeare_gives_todays_token_files_byte_for_byte(tokenizer):
    # sha256 prefixes of train.bin / val.bin written by the in-memory path this replaced (commit 0be3fe1).
    before = {"char": ("6ec305602a99ac28", "d37d30cc0c8327c2"),
              "bpe": ("5c9c88958e64d4d9", "d3b7ccfb0b901dce"),
              "gpt2": ("502a2bdc8210d1ac", "68a53422394c26a6")}[tokenizer]
    ds = prepared(SHAKESPEARE, tokenizer=tokenizer, gpt2_ranks=str(RANKS))
    got = tuple(hashlib.sha256(b"".join(f.read_bytes() for f in shards.shard_files(ds.folder, s)))
                .hexdigest()[:16] for s in ("train", "val"))
    assert got == before


def test_the_built_in_corpus_gives_todays_token_files():
    ds = prepare.prepare(config.resolve(), log=lambda m: None)
    got = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(ds.folder.glob("*.bin"))}
    assert got["train.bin"] == "5e6841f0a4aee355" and got["val.bin"] == "77e48761e2dba884"
    assert got["train_mask.bin"] == "687c1906eb2065f9" and got["val_segments.bin"] == "f2f15c8674e5f299"


@needs_ranks
def test_cutting_a_large_file_into_pieces_changes_no_token(tmp_path):
    """Pieces of 2 KB of a text whose lines end in spaces, tabs and blank lines (a cut after such a newline
    would merge it with the spaces before it): the same tokens as tiktoken on the whole text."""
    import tiktoken  # noqa: F401  (the tokenizer's own engine)

    from tinygpt.tokenizer import GPT2Tokenizer

    rng = np.random.default_rng(1)
    ends = ["", " ", "  ", "\t", " \n", "\n\n", "   \n  "]
    text = "".join(" ".join(rng.choice(WORDS, rng.integers(1, 9))) + rng.choice(ends) + "\n"
                   for _ in range(3000))
    (tmp_path / "big.txt").write_text(text)
    ds = prepared(tmp_path / "big.txt", tokenizer="gpt2", gpt2_ranks=str(RANKS), chunk_bytes=2048, workers=1)
    enc = GPT2Tokenizer.build(str(RANKS), [])._enc
    # The val split starts at an exact byte (the rule that keeps published figures valid), so each split is
    # compared with tiktoken on its own text.
    splits = [np.asarray(split.tokens[np.arange(len(split.tokens))]).tolist() for split in (ds.train, ds.val)]
    texts = [enc.decode(ids) for ids in splits]
    assert len(text) > 20 * 2048 and "".join(texts) == text
    assert [enc.encode_ordinary(t) for t in texts] == splits


@pytest.mark.parametrize("tokenizer", ["char", pytest.param("gpt2", marks=needs_ranks)])
def test_two_workers_write_the_shards_one_writes(tmp_path, tokenizer):
    """Worker processes write the bytes one process writes (gpt2 through tiktoken's array path, char through
    the generic one), with pieces of 2 KB so that many are in flight."""
    (tmp_path / "corpus").mkdir()
    for i, t in enumerate(docs(n=40, lines=60)):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(t)
    out = {}
    for n in (1, 2):
        ds = prepared(tmp_path / "corpus", tmp_path / f"out{n}", tokenizer=tokenizer, gpt2_ranks=str(RANKS),
                      workers=n, chunk_bytes=2048, shard_tokens=5000)
        assert ds.meta["workers"] == n
        out[n] = digest(tmp_path / f"out{n}")
    assert out[1] == out[2] and len(out[1]) > 4


def test_jsonl_parquet_compressed_files_and_a_dataset_folder_give_the_text_folders_token_stream(tmp_path):
    import zstandard

    texts = docs()
    compress = {"gz": gzip.compress, "xz": lzma.compress, "zst": zstandard.ZstdCompressor().compress}
    for folder in ("txt", *compress):
        (tmp_path / folder).mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
        for kind, squeeze in compress.items():
            (tmp_path / kind / f"{i:02d}.txt.{kind}").write_bytes(squeeze(t.encode()))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    reference = prepared(tmp_path / "txt", tokenizer="char")
    for source in ("gz", "xz", "zst", "docs.jsonl", "docs.parquet", "hf"):
        ds = prepared(tmp_path / source, tokenizer="char")
        assert np.array_equal(stream_of(ds), stream_of(reference)), source
        # whole documents go to val there: every document boundary keeps its end-of-text id
        assert ds.meta["train_documents"] + ds.meta["val_documents"] == len(texts)


def test_windows_span_shard_ends_as_one_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    parts = [tokens[:300], tokens[300:301], tokens[301:]]
    starts = np.array([0, 290, 299, 650, 983])
    one, many = windows(Split(tokens), starts, 16), windows(Split(TokenStream(parts)), starts, 16)
    assert all(np.array_equal(a, b) for a, b in zip(one[:2], many[:2]))
    assert len(TokenStream(parts)) == 1000


def big_corpus(folder, megabytes):
    folder.mkdir()
    line = "".join(f"{w} " for w in WORDS) + "\n"
    for i in range(megabytes):
        (folder / f"{i:03d}.txt").write_text(line * (1_000_000 // len(line)))
    return folder


PREPARE = [sys.executable, "-m", "tinygpt", "prepare", "--tokenizer", "char", "--workers", "1",
           "--data.chunk_bytes", "50000", "--data.shard_tokens", "200000"]


def test_a_prepare_killed_midway_continues_to_the_same_bytes(tmp_path):
    corpus = big_corpus(tmp_path / "corpus", 12)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(PREPARE + ["--data", str(corpus), "--out", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True)
    out = tmp_path / "killed"
    partial = tmp_path / "killed.partial"
    proc = subprocess.Popen(PREPARE + ["--data", str(corpus), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while (len(shards.shard_files(partial, "train")) < 3 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the prepare finished before it could be killed")
    assert not out.exists() and (partial / "progress.json").exists()
    again = subprocess.run(PREPARE + ["--data", str(corpus), "--out", str(out)], env=env, capture_output=True,
                           text=True, check=True)
    assert "continuing the prepare" in again.stderr
    assert digest(out) == digest(tmp_path / "whole") and len(digest(out)) > 10 and not partial.exists()


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    def peak_kb(megabytes):
        corpus = big_corpus(tmp_path / f"c{megabytes}", megabytes)
        code = ("import resource, sys; from tinygpt.cli import main; main(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        run = subprocess.run([sys.executable, "-c", code, *PREPARE[3:], "--data", str(corpus), "--out",
                              str(tmp_path / f"o{megabytes}")], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])
    small, large = peak_kb(2), peak_kb(16)
    # the in-memory path this replaced held ~12 bytes per byte of text: 16 MB more text would be ~190 MB
    assert large - small < 20_000, (small, large)


def test_token_files_are_checked(tmp_path):
    (tmp_path / "nano").mkdir()
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "nano" / "train.bin")
    (tmp_path / "nano" / "val.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(TinyGPTError, match=r"val.bin: 3 bytes of tokens is not a multiple of 2"):
        prepared(tmp_path / "nano", tokenizer="gpt2", gpt2_ranks=str(RANKS))
    with pytest.raises(TinyGPTError, match="give --tokenizer gpt2"):
        prepared(tmp_path / "nano", tokenizer="char")
    (tmp_path / "llmc").mkdir()
    header = np.zeros(256, dtype="<i4")
    header[:3] = [shards.LLMC_MAGIC, 1, 10]
    ids = np.arange(10, dtype="<u2").tobytes()
    (tmp_path / "llmc" / "x_val_000000.bin").write_bytes(header.tobytes() + ids)
    header[0] = 1234
    (tmp_path / "llmc" / "x_train_000001.bin").write_bytes(header.tobytes() + ids)
    with pytest.raises(TinyGPTError, match=r"x_train_000001.bin: shard header has magic 1234, expected 2024"):
        prepared(tmp_path / "llmc", tokenizer="gpt2", gpt2_ranks=str(RANKS))


def test_a_parquet_file_without_the_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": docs(20)}), tmp_path / "d.parquet")
    with pytest.raises(TinyGPTError, match=r"d.parquet has no column 'text' \(it has body\)"):
        prepared(tmp_path / "d.parquet", tokenizer="char")
    assert prepared(tmp_path / "d.parquet", tokenizer="char", text_field="body").meta["val_tokens"] > 0


@needs_ranks
def test_nanogpt_and_llmc_token_files_train_like_the_same_tokens_prepared_from_text(tmp_path):
    from tinygpt import run as tinygpt_run

    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:60_000])
    ds = prepared(text, tokenizer="gpt2", gpt2_ranks=str(RANKS))
    train, val = (np.asarray(s.tokens[np.arange(len(s.tokens))], dtype=np.uint16) for s in (ds.train, ds.val))
    (tmp_path / "nano").mkdir()
    train.tofile(tmp_path / "nano" / "train.bin")
    val.tofile(tmp_path / "nano" / "val.bin")
    (tmp_path / "llmc").mkdir()
    for name, ids in (("shakespeare_train_000000.bin", train), ("shakespeare_val_000000.bin", val)):
        header = np.zeros(256, dtype="<i4")
        header[:3] = [shards.LLMC_MAGIC, 1, len(ids)]
        (tmp_path / "llmc" / name).write_bytes(header.tobytes() + ids.astype("<u2").tobytes())

    def final_val(source):
        cfg = config.resolve("cpu-tiny", flags={
            "data.path": str(source), "data.tokenizer": "gpt2", "data.gpt2_ranks": str(RANKS),
            "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 32,
            "train.batch_size": 4, "train.max_iters": 6, "train.eval_interval": 6, "train.eval_iters": 2})
        run = tinygpt_run.create(cfg, tmp_path / f"run-{source.name}", log=lambda m: None)
        run.train(log=lambda m: None)
        lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
        return [x["val_loss"] for x in lines if "val_loss" in x][-1]

    losses = {final_val(p) for p in (text, tmp_path / "nano", tmp_path / "llmc")}
    assert len(losses) == 1, losses


def test_training_on_many_shards_matches_one_shard(tmp_path):
    from tinygpt import run as tinygpt_run

    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:40_000])

    def losses(shard_tokens):
        out = tmp_path / f"prepared-{shard_tokens}"
        ds = prepared(text, out, tokenizer="char", shard_tokens=shard_tokens)
        assert ds.meta["train_shards"] == -(-ds.meta["train_tokens"] // shard_tokens)
        cfg = config.resolve("cpu-tiny", flags={
            "data.path": str(out), "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16,
            "model.block_size": 32, "train.batch_size": 8, "train.max_iters": 6, "train.eval_interval": 3,
            "train.eval_iters": 2})
        run = tinygpt_run.create(cfg, tmp_path / f"run-{shard_tokens}", log=lambda m: None)
        run.train(log=lambda m: None)
        return [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]

    many, one = losses(1000), losses(10**9)  # 36 shards, windows spanning their ends, against one file
    assert [(m["train_loss"], m.get("val_loss")) for m in many] == [(m["train_loss"], m.get("val_loss"))
                                                                      for m in one]


def test_bad_input_leaves_no_partial_dataset(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("fine text\n" * 50)
    (tmp_path / "corpus" / "b.txt").write_bytes(b"\x00" * 10)
    with pytest.raises(TinyGPTError, match=r"b.txt looks like a binary file \(NUL byte at offset 0\)"):
        prepared(tmp_path / "corpus", tmp_path / "out", tokenizer="char")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    skipped = prepared(tmp_path / "corpus", tmp_path / "out", tokenizer="char", on_error="skip")
    assert skipped.meta["skipped_documents"] == 1 and skipped.meta["train_documents"] == 1


def test_conversations_packed_by_two_workers_match_one(tmp_path, monkeypatch):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i % 7}?"},
                                      {"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."}]})
             for i in range(1500)]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    out = {}
    for n in (1, 2):
        monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / f"cache{n}"))  # no reuse of the first's output
        ds = prepared(tmp_path / "chats.jsonl", tmp_path / f"out{n}", tokenizer="char", workers=n,
                      chunk_bytes=1000)
        assert ds.packed and ds.meta["val_conversations"] == 150
        out[n] = {f.name: f.read_bytes() for f in sorted((tmp_path / f"out{n}").glob("*.*"))}
    assert out[1] == out[2] and len(out[1]) == 9


def test_eval_on_a_prepared_folder_scores_its_val_split_with_the_runs_tokenizer(tmp_path):
    from tinygpt import run as tinygpt_run
    from tinygpt.evaluate import evaluate_run

    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:30_000])
    ds = prepared(text, tmp_path / "char", tokenizer="char")
    cfg = config.resolve("cpu-tiny", flags={
        "data.path": str(tmp_path / "char"), "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16,
        "model.block_size": 32, "train.batch_size": 4, "train.max_iters": 2, "train.eval_interval": 2,
        "train.eval_iters": 1})
    run = tinygpt_run.create(cfg, tmp_path / "run", log=lambda m: None)
    run.train(log=lambda m: None)
    ckpt = tinygpt_run.load(run.dir)
    scored = evaluate_run(ckpt, str(tmp_path / "char"), log=lambda m: None)
    assert scored["target_tokens"] == (ds.meta["val_tokens"] - 1) // 32 * 32  # whole windows of the val split
    prepared(text, tmp_path / "bpe", tokenizer="bpe", vocab_size=300)
    with pytest.raises(TinyGPTError, match="prepared with another tokenizer"):
        evaluate_run(ckpt, str(tmp_path / "bpe"), log=lambda m: None)


def test_a_full_disk_stops_with_one_line_and_the_rerun_continues(tmp_path, monkeypatch):
    import errno

    corpus = big_corpus(tmp_path / "corpus", 3)
    settings = dict(tokenizer="char", chunk_bytes=50_000, shard_tokens=200_000, workers=1)
    prepared(corpus, tmp_path / "whole", **settings)
    write, calls = shards.ShardWriter.write, []

    def filling_up(self, ids):
        calls.append(1)
        if len(calls) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, ids)
    monkeypatch.setattr(shards.ShardWriter, "write", filling_up)
    with pytest.raises(TinyGPTError, match="the disk is full .*run the same command again to continue"):
        prepared(corpus, tmp_path / "out", **settings)
    assert (tmp_path / "out.partial" / "progress.json").exists() and not (tmp_path / "out").exists()
    monkeypatch.setattr(shards.ShardWriter, "write", write)
    prepared(corpus, tmp_path / "out", **settings)
    assert digest(tmp_path / "out") == digest(tmp_path / "whole")


def test_a_hub_dataset_is_streamed_with_every_nth_document_held_out(tmp_path, monkeypatch):
    import datasets

    texts = docs(20)
    asked = []

    def streamed(name, split=None, streaming=False, **kw):  # the Hub, offline: a local iterable dataset
        asked.append((name, split, streaming))
        return datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", streamed)
    ds = prepared("someone/texts", tmp_path / "out", tokenizer="char", format="hf")
    assert asked[-1] == ("someone/texts", "train", True)
    assert ds.meta["val_rule"] == "every 10th document" and ds.meta["val_documents"] == 2
    eot = ds.tokenizer.eot_id
    val = np.asarray(ds.val.tokens[np.arange(len(ds.val.tokens))])
    assert ds.tokenizer.decode(val[val != eot].tolist()) == texts[9] + texts[19]
    train = np.asarray(ds.train.tokens[np.arange(len(ds.train.tokens))])
    assert ds.tokenizer.decode(train[train != eot].tolist()) == "".join(texts[:9] + texts[10:19])
