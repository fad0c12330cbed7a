"""`tinygpt report`: one file comparing runs: their curves, their final figures, how their configs differ and
a few
samples from each. A .png is the figure alone; .html and .md embed it as a data URI, so the report is one file
that can be mailed or attached to an issue without the run directories."""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt import run as tinygpt_run
from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.infer.decoder import sample_texts
from tinygpt.infer.generate import prompt_ids, seeded_generator
from tinygpt.report.listing import state_of
from tinygpt.report.plots import figure_png
from tinygpt.report.records import RunRecord, differing_keys, parameter_count, read_run, run_labels
from tinygpt.rundir import atomic_file

FORMATS = (".png", ".html", ".md")
SAMPLE_SEED = 0  # the same runs give the same report


@dataclass
class Report:
    labels: list[str]  # labels[i] names records[i]
    records: list[RunRecord]
    png: bytes
    samples: dict[str, list[str]]  # per label; both empty when no samples were asked for
    notes: dict[str, str]  # per label, why it has no samples

    @property
    def sampled(self) -> bool:
        return bool(self.samples or self.notes)


def write_report(runs: list[Path], out: Path, samples: int = 2, sample_tokens: int = 120,
                 log: Callable[[str], None] = print) -> Path:
    """Write the report on the run directories `runs` to `out`, whose suffix (.png, .html or .md) picks the
    format,
    with `samples` texts of up to `sample_tokens` tokens from each run's last checkpoint (not in a .png)."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise UsageError(f"a report is written as {', '.join(FORMATS)}; {out.name} has none of these "
                         "suffixes")
    if not runs:
        raise UsageError("name at least one run directory to report on")
    records = []
    for path in runs:
        records.append(read_run(Path(path)))
        log(f"read {path}: {describe(records[-1])}")
    labels = run_labels(records)
    png = figure_png(records, labels)
    if out.suffix.lower() == ".png":
        _write_atomic(out, png)
    else:
        report = Report(labels, records, png, {}, {})
        for label, record in zip(labels, records):
            try:
                if samples > 0:
                    report.samples[label] = run_samples(record, samples, sample_tokens)
            except TinyGPTError as e:  # a run that crashed before its first checkpoint still gets its curves
                report.notes[label] = f"no samples: {e}"
        render = html_page if out.suffix.lower() == ".html" else markdown
        _write_atomic(out, render(report).encode("utf-8"))
    log(f"wrote {out}")
    return out


def describe(record: RunRecord) -> str:
    last = record.last
    if last is None:
        return "no evaluations yet"
    where = "final" if record.final else "last"
    return (f"{len(record.metrics)} evaluations, {where} step {last.get('step')} val loss "
            f"{_number(last.get('val_loss'), 4)}")


def run_samples(record: RunRecord, n: int, tokens: int) -> list[str]:
    """n texts sampled from the run's last checkpoint with its own sample settings, seeded so they repeat."""
    ckpt = tinygpt_run.load(record.dir, "last", device="cpu", dtype="float32")
    sampling = dataclasses.replace(ckpt.config.sample, max_new_tokens=tokens)
    return sample_texts(ckpt.model, ckpt.tokenizer, prompt_ids(ckpt.tokenizer, ""), sampling, n,
                        seeded_generator(ckpt.model, SAMPLE_SEED))


def final_figures(record: RunRecord) -> dict[str, str]:
    """The run's final figures as table cells (those of its last evaluation if it has not finished)."""
    entry = record.last or {}
    loss = entry.get("val_loss")
    ppl = entry.get("val_ppl", math.exp(loss) if isinstance(loss, float | int) and loss < 700 else None)
    state = state_of(record)
    return {"state": state, "val loss": _number(loss, 4), "perplexity": _number(ppl, 2),
            "bits/byte": _number(entry.get("val_bpb"), 3), "steps": _text(entry.get("step")),
            "tokens": _count(entry.get("tokens_seen")), "training time": _duration(entry.get("elapsed_s")),
            "parameters": _count(parameter_count(record)), "device": _text(record.status.get("device")),
            "dtype": _text(record.status.get("dtype"))}


def final_table(report: Report) -> tuple[list[str], list[list[str]]]:
    cells = [final_figures(r) for r in report.records]
    return ["run", *cells[0]], [[label, *row.values()] for label, row in zip(report.labels, cells)]


def benchmark_table(report: Report) -> tuple[list[str], list[list[str]]] | None:
    """Each run's newest `tinygpt eval --tasks` result per task and metric; None when no run has one."""
    rows = [[label, b["task"], b["metric"], _number(b["value"], 4) + (
             f" ± {b['stderr']:.4f}" if isinstance(b["stderr"], float | int) else ""),
             _text(b["samples"]), _text(b["fewshot"]), _text(b["step"])]
            for label, r in zip(report.labels, report.records) for b in r.benchmarks]
    return (["run", "task", "metric", "value", "items", "few-shot", "step"], rows) if rows else None


def config_table(report: Report) -> tuple[list[str], list[list[str]]]:
    differ = differing_keys(report.records)
    return ["key", *report.labels], [[key, *(_text(v) for v in values)] for key, values in differ.items()]


def config_note(report: Report) -> str | None:
    """Why there is no config table, or None when there is one."""
    if len(report.records) == 1:
        return "One run: there is nothing to compare."
    return None if differing_keys(report.records) else "The runs' configs are the same."


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float | int) else "-"


def _count(value: Any) -> str:
    """12345678 -> 12.3M: token and parameter counts are read for their size."""
    if not isinstance(value, int):
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, float | int):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    return (f"{minutes} min {int(seconds % 60):02d} s" if minutes < 60
            else f"{minutes // 60} h {minutes % 60:02d} min")


def _text(value: Any) -> str:
    """A value as a cell: "-" for none, '""' for an empty string (an empty cell would read as missing)."""
    return "-" if value is None else '""' if value == "" else str(value)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


PAGE_STYLE = """body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1240px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f4f4f4; } td { font-variant-numeric: tabular-nums; } img { max-width: 100%; }
pre { background: #f7f7f7; padding: 8px; white-space: pre-wrap; }"""


def html_page(report: Report) -> str:
    """The report as one HTML page: inline style, the figure as a data URI, nothing fetched from elsewhere."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>tinygpt report</title>',
             f"<style>\n{PAGE_STYLE}\n</style></head><body>", "<h1>tinygpt report</h1>",
             f'<img alt="training curves" src="{_data_uri(report.png)}">',
             "<h2>Final figures</h2>", _html_table(*final_table(report))]
    if benchmarks := benchmark_table(report):
        parts += ["<h2>Benchmarks</h2>", _html_table(*benchmarks)]
    parts.append("<h2>Config differences</h2>")
    note = config_note(report)
    parts.append(f"<p>{note}</p>" if note else _html_table(*config_table(report)))
    if report.sampled:
        parts.append("<h2>Samples</h2>")
        for label in report.labels:
            parts.append(f"<h3>{html.escape(label)}</h3>")
            if label in report.notes:
                parts.append(f"<p>{html.escape(report.notes[label])}</p>")
            parts += [f"<pre>{html.escape(text)}</pre>" for text in report.samples.get(label, [])]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def markdown(report: Report) -> str:
    """The report as Markdown: the figure as a data-URI image, Markdown tables, samples in fenced blocks."""
    parts = ["# tinygpt report", f"![training curves]({_data_uri(report.png)})", "## Final figures",
             _md_table(*final_table(report))]
    if benchmarks := benchmark_table(report):
        parts += ["## Benchmarks", _md_table(*benchmarks)]
    parts += ["## Config differences", config_note(report) or _md_table(*config_table(report))]
    if report.sampled:
        parts.append("## Samples")
        for label in report.labels:
            parts.append(f"### {label}")
            if label in report.notes:
                parts.append(report.notes[label])
            parts += [_fenced(text) for text in report.samples.get(label, [])]
    return "\n\n".join(parts) + "\n"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)])


def _fenced(text: str) -> str:
    """text in a code block whose fence is longer than any run of backticks in it, so no sample can close
    it."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def _write_atomic(out: Path, data: bytes) -> None:
    """Write out whole or not at all (see rundir.atomic_file)."""
    try:
        with atomic_file(out) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise TinyGPTError(f"cannot write {out}: {e.strerror}; choose another --out") from None
