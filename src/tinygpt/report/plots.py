"""The report's figure: the runs' training curves, overlaid one colour per run, as PNG bytes.

The figure is drawn on a matplotlib Figure of its own with the Agg canvas, never through pyplot, so that
drawing it neither opens a window nor changes the backend or the figures of a program that calls it.
"""

from __future__ import annotations

import io
from typing import Any

from tinygpt.errors import TinyGPTError
from tinygpt.report.records import RunRecord

FIGSIZE = (12, 7)  # inches; at DPI a 1200 x 700 PNG, small enough to embed in a page
DPI = 100
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "font.size": 9, "axes.titlesize": 10, "lines.linewidth": 1.6, "figure.facecolor": "white"}
# (title, x key, x label, y label, y keys drawn solid then dashed)
PANELS = [
    ("Loss by step", "step", "step", "loss", ("train_loss", "val_loss")),
    ("Loss by tokens seen", "tokens_seen", "tokens seen", "loss", ("train_loss", "val_loss")),
    ("Val loss by wall time", "elapsed_s", "elapsed (s)", "val loss", ("val_loss",)),
    ("Learning rate", "step", "step", "learning rate", ("lr",)),
    ("Throughput", "step", "step", "tokens/s", ("tokens_per_s",)),
]
DASHED = {"val_loss"}  # val curves dashed where a panel shows train and val; alone, a line is solid


def figure_png(records: list[RunRecord], labels: list[str]) -> bytes:
    """The grid of PANELS for the records (labels[i] names records[i] in the legend), as PNG bytes."""
    mpl = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    with mpl.rc_context(STYLE):
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 3).flat
        for ax, (title, x, xlabel, ylabel, ys) in zip(axes, PANELS):
            for i, record in enumerate(records):
                for y in ys:
                    _curve(ax, record.metrics, x, y, f"C{i % 10}", "--" if y in DASHED and len(ys) > 1
                           else "-")
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        legend = axes[len(PANELS)]  # the grid's spare panel holds the legend, readable however many runs
        legend.axis("off")
        handles = [Line2D([], [], color=f"C{i % 10}", label=label) for i, label in enumerate(labels)]
        handles += [Line2D([], [], color="grey", label="train"),
                    Line2D([], [], color="grey", ls="--", label="val")]
        legend.legend(handles=handles, loc="center", frameon=False, fontsize=10)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _curve(ax: Any, metrics: list[dict[str, Any]], x: str, y: str, color: str, style: str) -> None:
    points = [(m[x], m[y]) for m in metrics if m.get(x) is not None and m.get(y) is not None]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=color, ls=style, marker="o" if len(points) == 1 else None)


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise TinyGPTError("tinygpt report needs matplotlib: pip install 'tinygpt[report]'") from None
    return matplotlib
