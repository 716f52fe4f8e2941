"""Curves: a run's metrics as (x, y) series, and `plot_series`, which draws them as a PNG.

A run's history is `read_metrics`' (the records a resume superseded left out), with each
record's wall-clock time counted from the run's first start. A series takes one metric
from it over steps, tokens seen or wall-clock seconds, skipping the records that lack the
metric or hold null (a non-finite value, `lmlab.runs.metrics`) or a non-finite number.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): nothing global changes,
no window opens, and a figure is exactly width_px x height_px pixels.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from lmlab.errors import UserError
from lmlab.fileio import atomic_write_bytes
from lmlab.runs.metrics import read_records

Point = tuple[float, float]
"""(x, y) of one curve."""
XAxis = Literal["step", "tokens", "elapsed"]
X_AXES: tuple[str, ...] = get_args(XAxis)
X_LABELS: dict[str, str] = {
    "step": "step",
    "tokens": "tokens seen",
    "elapsed": "wall-clock time (s)",
}
WALL_KEY = "wall_s"
"""Added to each history record: seconds since the run first started, over all invocations."""
NOT_METRICS = frozenset({"step", "elapsed_s", WALL_KEY})
"""Numeric keys of a record that are axes or bookkeeping, not metrics."""

DPI = 100
WIDTH_PX = 800
HEIGHT_PX = 400
SPARSE_POINTS = 30
"""A curve with at most this many points gets markers (eval curves, short runs)."""


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records `read_metrics` returns, each with WALL_KEY added (when it logged
    elapsed_s): the wall-clock seconds since the run first started, summed over its
    invocations as `wall_time_s` sums them."""
    history: list[dict[str, Any]] = []
    offset = last = 0.0  # earlier invocations' wall time; this invocation's so far
    for record in read_records(run_dir):
        event = record.get("event")
        if event == "start":
            offset, last = offset + last, 0.0
        if event in ("start", "rollback"):  # as read_metrics: later steps are superseded
            history = [r for r in history if r["step"] <= record["step"]]
            continue
        elapsed = record.get("elapsed_s")
        if _finite(elapsed):
            last = max(last, elapsed)
            record = {**record, WALL_KEY: offset + elapsed}
        history.append(record)
    return history


def available_metrics(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys that hold a finite number in at least one record, in first-seen order."""
    found: dict[str, None] = {}
    for record in history:
        for key, value in record.items():
            if key not in NOT_METRICS and _finite(value):
                found.setdefault(key)
    return list(found)


def metric_series(
    history: Sequence[Mapping[str, Any]], metric: str, x: XAxis = "step"
) -> list[Point]:
    """(x, value) of every record with a finite `metric`, in log order. For x="tokens", a
    record without tokens_seen (an eval line) takes the tokens at its step, interpolated
    between the training lines around it."""
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}: one of {', '.join(X_AXES)}")
    tokens_at = _tokens_by_step(history) if x == "tokens" else None
    points = []
    for record in history:
        value = record.get(metric)
        if not _finite(value):
            continue
        if x == "step":
            where = record.get("step")
        elif x == "elapsed":
            where = record.get(WALL_KEY)
        else:
            where = record.get("tokens_seen")
            if not _finite(where) and _finite(record.get("step")) and tokens_at is not None:
                where = tokens_at(record["step"])
        if _finite(where):
            points.append((float(where), float(value)))
    return points


def _tokens_by_step(history: Sequence[Mapping[str, Any]]):
    """step -> tokens seen, from the training lines: linear between two of them, at the
    last known tokens per step beyond them; None when no line logged tokens_seen."""
    known = sorted(
        {
            (float(r["step"]), float(r["tokens_seen"]))
            for r in history
            if _finite(r.get("step")) and _finite(r.get("tokens_seen"))
        }
    )
    if not known:
        return None
    known = [(0.0, 0.0), *[(s, t) for s, t in known if s > 0]]
    steps = [s for s, _ in known]

    def tokens_at(step: float) -> float:
        i = bisect.bisect_left(steps, step)
        if i < len(steps) and steps[i] == step:
            return known[i][1]
        if i == len(steps):  # past the last training line: its rate per step
            s, t = known[-1]
            return step * t / s if s else 0.0
        (s0, t0), (s1, t1) = known[i - 1], known[i]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)

    return tokens_at


def run_label(run_dir: str | Path) -> str:
    """NAME/RUN_ID, as `lmlab runs` names a run."""
    run = Path(run_dir)
    return f"{run.parent.name}/{run.name}"


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """A label per run: NAME/RUN_ID, or the path where two runs would share one."""
    labels = [run_label(run) for run in runs]
    return [
        label if labels.count(label) == 1 else str(run)
        for label, run in zip(labels, runs, strict=True)
    ]


def plot_metric(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    *,
    x: XAxis = "step",
    log_y: bool = False,
    out: str | Path | None = None,
    width_px: int = WIDTH_PX,
    height_px: int = HEIGHT_PX,
) -> bytes:
    """One figure of `metric`, one line per run ({label: history}); a UserError listing the
    run's metrics when one of them never logged it."""
    series = {}
    for label, history in histories.items():
        points = metric_series(history, metric, x)
        if not points:
            metrics = available_metrics(history)
            has = f"it has: {', '.join(metrics)}" if metrics else "it has logged no metrics yet"
            raise UserError(f"run {label} has no {metric!r} values; {has}")
        series[label] = points
    return plot_series(
        series,
        title=metric,
        xlabel=X_LABELS[x],
        ylabel=metric,
        log_y=log_y,
        out=out,
        width_px=width_px,
        height_px=height_px,
    )


def plot_series(
    series: Mapping[str, Sequence[Point]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    log_x: bool = False,
    dashed: Sequence[str] = (),
    out: str | Path | None = None,
    width_px: int = WIDTH_PX,
    height_px: int = HEIGHT_PX,
) -> bytes:
    """Draw {label: [(x, y), ...]} as one line per label on shared axes, with a legend, and
    return the PNG (width_px x height_px); with `out`, also write it there atomically.

    Colours follow the order of `series` (C0, C1, ...) whether or not a label has points,
    so several figures of the same runs colour each run the same. An empty series is
    left out of the legend; with none at all, the figure says "no data". Series named in
    `dashed` (fits, predictions) are drawn dashed, without markers.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for i, (label, points) in enumerate(series.items()):
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            label=label,
            color=f"C{i % 10}",
            linewidth=1.5,
            linestyle="--" if label in dashed else "-",
            marker="o" if len(points) <= SPARSE_POINTS and label not in dashed else None,
            markersize=3,
        )
        drawn += 1
    if drawn:
        if log_y:
            ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()  # arranges inside the canvas: the pixel size stays as asked
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    png = buffer.getvalue()
    if out is not None:
        atomic_write_bytes(out, png)
    return png


def _matplotlib():
    """(Figure, FigureCanvasAgg), or a one-line UserError naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'lmlab[export]'") from None
    return Figure, FigureCanvasAgg


def _finite(value: Any) -> bool:
    """A real number (not a bool, not None) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
