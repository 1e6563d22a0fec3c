"""Loss curves from a run's `metrics.jsonl`, drawn with matplotlib (the optional `plot` extra).

matplotlib is imported only inside the functions that draw, so the rest of chargpt works without
it. Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly: no pyplot, no
global backend switch, safe in any process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chargpt.data.files import atomic_write
from chargpt.errors import ChargptError
from chargpt.runs.metrics import read_metrics

LOSS_PLOT = "loss.png"
INSTALL_HINT = "pip install 'chargpt[plot]'"


def new_figure(width: float, height: float) -> Any:
    """An empty figure on the Agg (file-only) canvas; a one-line error if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ChargptError(f"plots need matplotlib: {INSTALL_HINT}") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: Path) -> None:
    """Write the figure as a PNG atomically: a reader never sees half an image."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def draw_curves(axes: Any, records: list[dict[str, Any]], label: str, color: str | None) -> None:
    """Validation loss (solid) and training loss (dashed) of one run against steps."""
    steps = [r["step"] for r in records]
    (line,) = axes.plot(
        steps, [r["val_loss"] for r in records], "-o", ms=3, color=color, label=f"{label} val"
    )
    axes.plot(
        steps,
        [r["train_loss"] for r in records],
        "--",
        color=line.get_color(),
        label=f"{label} train",
    )


def add_tokens_axis(axes: Any, records: list[dict[str, Any]]) -> None:
    """A second x axis on top: tokens seen, when the run records them (tokens = step * B * T)."""
    last = records[-1]
    if not last.get("tokens") or not last["step"]:
        return
    per_step = last["tokens"] / last["step"]
    top = axes.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
    top.set_xlabel("tokens seen")


def style_loss_axes(axes: Any, title: str) -> None:
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per character)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw a run's train/val loss against steps (and tokens) into `out` (default: loss.png in
    the run)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    figure = new_figure(7, 4.5)
    axes = figure.subplots()
    draw_curves(axes, records, "", None)
    add_tokens_axis(axes, records)
    style_loss_axes(axes, f"{run_dir.name}: loss during training")
    out = Path(out) if out else run_dir / LOSS_PLOT
    save_figure(figure, out)
    return out


def plot_after_training(run_dir: Path) -> Path | None:
    """loss.png at the end of training: skipped (None) without matplotlib or loss records, since
    the run itself is already safe on disk and `chargpt plot` can draw it later."""
    try:
        return plot_run(run_dir)
    except ChargptError:
        return None


def plot_comparison(
    curves: dict[str, list[dict[str, Any]]], references: dict[str, float], out: Path
) -> Path:
    """Several runs' loss curves on one set of axes, with horizontal reference lines (e.g. the
    count-based bigram's validation cross-entropy)."""
    figure = new_figure(8, 5)
    axes = figure.subplots()
    for (label, records), color in zip(curves.items(), ("C0", "C1", "C2", "C3"), strict=False):
        draw_curves(axes, records, label, color)
    for (label, value), color in zip(references.items(), ("0.35", "0.6"), strict=False):
        axes.axhline(value, color=color, linestyle=":", label=f"{label}: {value:.3f}")
    add_tokens_axis(axes, next(iter(curves.values())))
    style_loss_axes(axes, "loss during training")
    save_figure(figure, out)
    return out
