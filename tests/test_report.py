import base64
import dataclasses
import html
import io
import json
import re
import shutil
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from conftest import tiny_flags, train_run
from tinygpt import run as tinygpt_run
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.report.document import write_report
from tinygpt.report.plots import DPI, FIGSIZE
from tinygpt.report.records import RunRecord, differing_keys, parameter_count, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two finished runs with four evaluations each, differing in train.lr and model.n_embd only."""
    root = tmp_path_factory.mktemp("report")
    text = root / "corpus.txt"
    text.write_text("".join(f"The {a} fox jumps over fence {i}.\n" for i,
                            a in enumerate(["quick", "slow", "red"] * 60)))
    common = {"train.max_iters": 12, "train.eval_interval": 3, "train.checkpoint_interval": 6}
    return [train_run(tmp_path_factory, root / name, "--data", str(text), "--tokenizer", "char",
                      *tiny_flags(**common, **extra))
            for name, extra in (("small", {}), ("wide", {"train.lr": 0.01, "model.n_embd": 32}))]


def differing_rows(records: list[RunRecord]) -> list[tuple[str, str, str]]:
    a, b = records
    return [(key, str(a.config[key]), str(b.config[key])) for key in ("model.n_embd", "train.lr")]


def embedded_png(uri_text: str) -> bytes:
    data = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", uri_text).group(1))
    assert data.startswith(PNG_MAGIC) and matplotlib.image.imread(io.BytesIO(data)).shape[:2] == (700, 1200)
    return data


def test_png_draws_a_curve_per_run(runs, tmp_path):
    logs = []
    out = write_report(runs, tmp_path / "curves.png", log=logs.append)
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [line.split()[0] for line in logs] == ["read", "read", "wrote"] and str(out) in logs[-1]
    rgb = (matplotlib.image.imread(out)[..., :3] * 255).round().astype(int)
    assert rgb.shape[:2] == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI)
    assert (rgb < 240).any(axis=-1).mean() > 0.02 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    panels = rgb[:, : rgb.shape[1] * 2 // 3]  # the legend (in the bottom right panel) shows the colours too
    for colour in ("#1f77b4", "#ff7f0e"):  # matplotlib's C0 and C1: the first and second run
        target = np.array(matplotlib.colors.to_rgb(colour)) * 255
        assert (np.abs(panels - target) <= 12).all(axis=-1).sum() > 500, colour


ROW_FORMS = {".html": ("<tr><td>{}</td><td>finished</td><td>{:.4f}</td>",
                       "<tr><td>{}</td><td>{}</td><td>{}</td></tr>"),
             ".md": ("| {} | finished | {:.4f} |", "| {} | {} | {} |")}


def report_with_facts(runs, path) -> str:
    """The report at path, checked for each run's final figures row and for the two differing config keys."""
    text = write_report(runs, path, log=lambda m: None).read_text(encoding="utf-8")
    figures_row, config_row = ROW_FORMS[path.suffix]
    records = [read_run(r) for r in runs]
    for r in records:
        assert figures_row.format(r.name, r.final["val_loss"]) in text
    for row in differing_rows(records):
        assert config_row.format(*row) in text
    return text


def test_html_report_is_one_self_contained_page(runs, tmp_path):
    page = report_with_facts(runs, tmp_path / "report.html")
    assert page.count("</tr>") == 1 + 2 + 1 + 2  # exactly two config rows: nothing else differs
    embedded_png(page)
    assert "<link" not in page and "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    assert "<h2>Samples</h2>" in page and page.count("<pre>") == 4


def test_markdown_report_has_the_same_facts_and_samples(runs, tmp_path):
    md = report_with_facts(runs, tmp_path / "report.md")
    embedded_png(re.search(r"!\[[^\]]*\]\((data:image/png;base64,[^)]+)\)", md).group(1))
    samples = re.findall(r"```text\n(.*?)\n```", md, flags=re.S)
    assert "## Samples" in md and len(samples) == 4
    page = write_report(runs, tmp_path / "report.html", log=lambda m: None).read_text(encoding="utf-8")
    assert samples == [html.unescape(s) for s in re.findall(r"<pre>(.*?)</pre>", page, flags=re.S)]  # seeded


def test_a_run_without_checkpoints_gets_its_curves_and_a_note(runs, tmp_path):
    bare = tmp_path / "crashed"
    bare.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(runs[0] / name, bare / name)
    md = write_report([bare], tmp_path / "r.md", log=lambda m: None).read_text(encoding="utf-8")
    assert "no samples: no usable checkpoint" in md and "One run: there is nothing to compare." in md
    assert "## Samples" not in write_report([bare], tmp_path / "r.md", samples=0,
                                            log=lambda m: None).read_text()


def test_bad_suffix_and_a_folder_that_is_not_a_run_are_refused(runs, tmp_path):
    with pytest.raises(UsageError, match=r"\.png, \.html, \.md"):
        write_report(runs, tmp_path / "report.txt")
    with pytest.raises(UsageError, match="not a run directory"):
        write_report([tmp_path], tmp_path / "report.md")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_read_run_skips_a_torn_last_line(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  n_layer: 2\ntrain:\n  lr: 0.001\n")
    rows = [{"step": 3, "val_loss": 2.5}, {"step": 6, "val_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "val_')
    (tmp_path / "status.json").write_text('{"state": "runn')  # caught mid-write
    r = read_run(tmp_path)
    assert r.metrics == rows and r.last == rows[-1] and r.final is None and r.best_val == 2.0
    assert r.config == {"model.n_layer": 2, "train.lr": 0.001} and r.status == {} and r.name == tmp_path.name
    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\nnot json\n{"step": 9}\n')
    with pytest.raises(TinyGPTError, match="line 2"):  # damage before the last line is not a crash's
        read_run(tmp_path)


def test_differing_keys_lists_exactly_the_keys_that_differ():
    def record(**cfg) -> RunRecord:
        return RunRecord(Path("x"), "x", cfg, [], {})

    a = record(**{"model.n_layer": 2, "train.lr": 0.01, "data.path": "a.txt"})
    b = record(**{"model.n_layer": 2, "train.lr": 0.02, "data.path": "a.txt", "train.log": ""})
    assert differing_keys([a, b]) == {"train.lr": [0.01, 0.02], "train.log": [None, ""]}
    assert differing_keys([a, a]) == {} and differing_keys([a]) == {}


def test_parameter_count_falls_back_to_the_checkpoint_header(runs):
    record = dataclasses.replace(read_run(runs[1]), status={})
    model = tinygpt_run.load(runs[1], "last", device="cpu").model
    assert parameter_count(record) == sum(p.numel() for p in model.parameters())
    assert parameter_count(dataclasses.replace(record, status={"params": 7})) == 7


def test_benchmarks_are_each_tasks_newest_result(runs, tmp_path):
    """RUN/eval/tasks-*.json (written by `tinygpt eval --tasks`): per task the newest file's metrics, as a
    Benchmarks table in .md and .html; an unreadable file is passed over."""
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "eval").mkdir()

    def saved(name: str, results: dict, step: int) -> None:
        (run / "eval" / f"tasks-{name}.json").write_text(json.dumps(
            {"step": step, "settings": {"num_fewshot": 0}, "results": results,
             "samples": {task: 40 for task in results}}))

    saved("20261201-100000-000000", {"hellaswag": {"acc": 0.25, "acc_stderr": 0.01, "acc_norm": 0.26},
                                     "arc_easy": {"acc": 0.30, "acc_stderr": "N/A"}}, 10)
    saved("20261202-100000-000000", {"hellaswag": {"acc": 0.27, "acc_stderr": 0.02}}, 20)
    (run / "eval" / "tasks-20261203-100000-000000.json").write_text("{not json")
    rows = {(b["task"], b["metric"]): b for b in read_run(run).benchmarks}
    assert set(rows) == {("hellaswag", "acc"), ("arc_easy", "acc")}  # newest: no acc_norm
    assert rows[("hellaswag", "acc")]["value"] == 0.27 and rows[("hellaswag", "acc")]["step"] == 20
    assert rows[("arc_easy", "acc")]["stderr"] == "N/A" and rows[("arc_easy", "acc")]["samples"] == 40
    md = write_report([run], tmp_path / "r.md", samples=0, log=lambda m: None).read_text()
    assert "## Benchmarks" in md and "| hellaswag | acc | 0.2700 ± 0.0200 | 40 | 0 | 20 |" in md
    page = write_report([run], tmp_path / "r.html", samples=0, log=lambda m: None).read_text()
    assert "<h2>Benchmarks</h2>" in page and "0.3000" in page
    plain = write_report([runs[0]], tmp_path / "p.md", samples=0, log=lambda m: None).read_text()
    assert "Benchmarks" not in plain
