"""`lmlab report`'s page: one self-contained HTML file about one or more runs.

    header     title, when and by which lmlab it was made
    runs       each run's folder, status, newest checkpoint, lmlab version, commit (if the
               run recorded one)
    curves     train loss, val loss, learning rate, tokens/s, gradient norm over steps;
               several runs share the axes, one colour each, named in the legend
    metrics    steps, tokens, wall time, last train loss, the last and best eval metrics
    samples    a few short generations from each run's newest checkpoint
    configs    the config keys that differ, and each run's config.yaml (collapsed)

Self-contained means the file alone is the report: figures are base64 PNGs in data: URIs,
the style sheet is inline, there is no script, and nothing is fetched, so it opens the
same offline, from an e-mail or years later. Every text from a run is HTML-escaped.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from lmlab import __version__
from lmlab.config import Config, load_config
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text
from lmlab.report.curves import metric_series, plot_series, read_history, run_labels
from lmlab.report.samples import MAX_NEW_TOKENS, SAMPLES_PER_PROMPT, RunSamples, generate_samples
from lmlab.runs.catalog import RunSummary, config_differences, summarize_run
from lmlab.runs.checkpoint import CorruptCheckpointError, list_checkpoints, read_meta
from lmlab.runs.folder import CONFIG_NAME
from lmlab.runs.status import read_recorded

FIGURES: tuple[tuple[str, str, str], ...] = (
    # (metric, title, y label)
    ("loss", "train loss", "loss"),
    ("val_loss", "val loss", "loss"),
    ("lr", "learning rate", "learning rate"),
    ("tokens_per_s", "throughput", "tokens/s"),
    ("grad_norm", "gradient norm", "gradient norm"),
)
FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX = 640, 340
"""Two figures side by side on a laptop screen, their text still legible."""
LOWER_IS_BETTER = ("val_loss", "val_perplexity", "val_bits_per_byte")
"""Eval metrics whose best value (the lowest) is shown beside the last one."""
NOT_EVAL_METRICS = ("val_tokens",)

ProgressCallback = Callable[[str, int, int], None]
"""on_progress(run label, runs done, runs to do) while samples are generated."""


@dataclass
class ReportOptions:
    title: str = ""
    """The page's title ("" for one naming the runs)."""
    samples: bool = True
    """Generate samples from each run's newest checkpoint."""
    prompts: list[str] = field(default_factory=list)
    """Prompts for the samples (none: the start of each run's val data)."""
    samples_per_prompt: int = SAMPLES_PER_PROMPT
    max_new_tokens: int = MAX_NEW_TOKENS
    device: str = "cpu"
    """Where the samples are generated."""


@dataclass
class Report:
    html: str
    figures: list[str]
    """Titles of the figures drawn, in page order (one <img> each)."""
    samples: int
    """Samples generated, over all runs."""
    warnings: list[str]
    """What is missing, one line each (samples that could not be made, curves never logged)."""


@dataclass
class _Run:
    label: str
    path: Path
    summary: RunSummary
    history: list[dict[str, Any]]
    config_text: str
    config: Config | None
    meta: dict[str, Any]
    """The newest checkpoint's meta.json ({} without one)."""
    commit: str | None
    samples: RunSamples | None = None
    samples_note: str = ""


def write_report(
    runs: Sequence[str | Path],
    out: str | Path,
    options: ReportOptions | None = None,
    on_progress: ProgressCallback | None = None,
) -> Report:
    """Build the report of `runs` (run folders) and write it to `out` atomically."""
    report = build_report(runs, options, on_progress)
    atomic_write_text(out, report.html)
    return report


def build_report(
    runs: Sequence[str | Path],
    options: ReportOptions | None = None,
    on_progress: ProgressCallback | None = None,
) -> Report:
    """The report of `runs` (run folders) as one HTML page."""
    options = options or ReportOptions()
    if not runs:
        raise UserError("a report needs at least one run")
    paths = [Path(run) for run in runs]
    found = [_read_run(path, label) for path, label in zip(paths, run_labels(paths), strict=True)]
    warnings: list[str] = []
    if options.samples:
        _add_samples(found, options, on_progress, warnings)
    figures, images, missing = _figures(found)
    if missing:
        warnings.append(f"not logged by any run, so not drawn: {', '.join(missing)}")
    title = options.title or "lmlab report: " + ", ".join(run.label for run in found)
    sections = [
        _header(title, found),
        _section("Curves", _curves(images, missing)),
        _section("Metrics", _metrics_table(found)),
    ]
    if options.samples:
        sections.append(_section("Samples", "".join(_samples(run) for run in found)))
    sections.append(_section("Configs", _configs(found)))
    page = _PAGE.format(title=escape(title), style=_STYLE, body="\n".join(sections))
    samples = sum(len(run.samples.samples) for run in found if run.samples)
    return Report(page, figures, samples, warnings)


def _read_run(path: Path, label: str) -> _Run:
    config_file = path / CONFIG_NAME
    try:
        config_text = config_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {config_file}: {e}") from None
    try:
        config = load_config(config_file)
    except UserError:  # a config this lmlab cannot parse: still shown as text
        config = None
    ckpts = list_checkpoints(path)
    try:
        meta = read_meta(ckpts[-1]) if ckpts else {}
    except CorruptCheckpointError:
        meta = {}
    commit = read_recorded(path).get("commit") or meta.get("commit")
    return _Run(
        label=label,
        path=path,
        summary=summarize_run(path),
        history=read_history(path),
        config_text=config_text,
        config=config,
        meta=meta,
        commit=str(commit) if commit else None,
    )


def _add_samples(
    runs: list[_Run],
    options: ReportOptions,
    on_progress: ProgressCallback | None,
    warnings: list[str],
) -> None:
    todo = [run for run in runs if run.summary.checkpoints]
    for run in runs:
        if not run.summary.checkpoints:
            run.samples_note = "no checkpoint yet"
    for done, run in enumerate(todo):
        if on_progress:
            on_progress(run.label, done, len(todo))
        try:
            run.samples = generate_samples(
                run.path,
                options.prompts,
                samples_per_prompt=options.samples_per_prompt,
                max_new_tokens=options.max_new_tokens,
                device=options.device,
            )
        except UserError as e:  # one run's checkpoint or vocabulary: the rest still report
            run.samples_note = f"no samples: {e}"
            warnings.append(f"{run.label}: no samples: {e}")
    if on_progress and todo:
        on_progress("", len(todo), len(todo))


# -- sections -----------------------------------------------------------------------------


def _figures(runs: list[_Run]) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(titles drawn, [(title, PNG as base64)], titles no run logged)."""
    titles, images, missing = [], [], []
    for metric, title, ylabel in FIGURES:
        series = {run.label: metric_series(run.history, metric) for run in runs}
        if not any(series.values()):
            missing.append(title)
            continue
        png = plot_series(
            series,
            title=title,
            xlabel="step",
            ylabel=ylabel,
            width_px=FIGURE_WIDTH_PX,
            height_px=FIGURE_HEIGHT_PX,
        )
        titles.append(title)
        images.append((title, base64.b64encode(png).decode("ascii")))
    return titles, images, missing


def _header(title: str, runs: list[_Run]) -> str:
    made = time.strftime("%Y-%m-%d %H:%M:%S %z")
    any_commit = any(run.commit for run in runs)
    header = ["run", "folder", "status", "newest checkpoint", "trained with"]
    if any_commit:
        header.append("commit")
    rows = []
    for run in runs:
        note = f" ({run.summary.status_note})" if run.summary.status_note else ""
        ckpt = run.summary.checkpoints[-1] if run.summary.checkpoints else None
        row = [
            run.label,
            str(run.path),
            run.summary.status + note,
            f"step {ckpt.step:,}" if ckpt else "none",
            f"lmlab {run.meta['lmlab']}" if run.meta.get("lmlab") else "-",
        ]
        if any_commit:
            row.append(run.commit or "not recorded")
        rows.append(row)
    return (
        f"<header><h1>{escape(title)}</h1>\n"
        f'<p class="made">made {escape(made)} by lmlab {escape(__version__)}</p></header>\n'
        + _section("Runs", _table(header, rows))
    )


def _curves(images: list[tuple[str, str]], missing: list[str]) -> str:
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(title)}"></figure>\n'
        for title, data in images
    )
    note = f'<p class="note">not logged: {escape(", ".join(missing))}</p>' if missing else ""
    return f'<div class="figures">\n{figures}</div>{note}'


def _metrics_table(runs: list[_Run]) -> str:
    def last(run: _Run, key: str) -> tuple[float, int] | None:
        points = metric_series(run.history, key)
        return (points[-1][1], int(points[-1][0])) if points else None

    def best(run: _Run, key: str) -> tuple[float, int] | None:
        points = metric_series(run.history, key)
        if not points:
            return None
        step, value = min(points, key=lambda p: p[1])
        return value, int(step)

    def at_step(found: tuple[float, int] | None) -> str:
        return "-" if found is None else f"{_number(found[0])} (step {found[1]:,})"

    rows = [
        ["status", *(run.summary.status for run in runs)],
        ["steps", *(_steps(run.summary) for run in runs)],
        ["tokens seen", *(_number(run.summary.tokens_seen) for run in runs)],
        ["wall time", *(_duration(run.summary.wall_s) for run in runs)],
        ["train loss (last)", *(at_step(last(run, "loss")) for run in runs)],
    ]
    keys: dict[str, None] = {}
    for run in runs:
        for record in run.history:
            keys.update(
                (k, None) for k in record if k.startswith("val_") and k not in NOT_EVAL_METRICS
            )
    for key in keys:
        rows.append([f"{key} (last)", *(at_step(last(run, key)) for run in runs)])
        if key in LOWER_IS_BETTER:
            rows.append([f"{key} (best)", *(at_step(best(run, key)) for run in runs)])
    return _table(["", *(run.label for run in runs)], rows, numeric=True)


def _samples(run: _Run) -> str:
    parts = [f"<h3>{escape(run.label)}</h3>"]
    if run.samples is None:
        parts.append(f'<p class="note">{escape(run.samples_note)}</p>')
        return "\n".join(parts)
    parts.append(
        f'<p class="note">from {escape(run.samples.checkpoint.name)} '
        f"(step {run.samples.step:,}); prompt in bold</p>"
    )
    for sample in run.samples.samples:
        start = f"<b>{escape(sample.prompt)}</b>" if sample.prompt else "<i>(a new document)</i> "
        parts.append(f'<pre class="sample">{start}{escape(sample.text)}</pre>')
    return "\n".join(parts)


def _configs(runs: list[_Run]) -> str:
    parts = []
    configs = [run.config for run in runs if run.config is not None]
    if len(runs) > 1 and len(configs) == len(runs):
        differences = config_differences(configs)
        if differences:
            rows = [[key, *(_value(v) for v in values)] for key, values in differences.items()]
            parts.append("<h3>Differences</h3>")
            parts.append(_table(["key", *(run.label for run in runs)], rows))
        else:
            parts.append('<p class="note">the configs are identical</p>')
    for run in runs:
        parts.append(
            f"<details><summary>{escape(run.label)}: config.yaml</summary>"
            f"<pre>{escape(run.config_text)}</pre></details>"
        )
    return "\n".join(parts)


# -- HTML pieces --------------------------------------------------------------------------


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{escape(heading)}</h2>\n{body}\n</section>"


def _table(header: list[str], rows: list[list[str]], numeric: bool = False) -> str:
    """A table of text cells (escaped here); with `numeric`, all but the first column are
    right-aligned."""
    cls = ' class="numeric"' if numeric else ""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows
    )
    return f"<table{cls}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def _number(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (abs(value) >= 1000 and value == int(value)):
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def _steps(summary: RunSummary) -> str:
    planned = f"{summary.steps_planned:,}" if summary.steps_planned is not None else "?"
    return f"{summary.steps_done:,} / {planned}"


def _duration(seconds: float) -> str:
    """3725 -> 1:02:05; 65 -> 1:05."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lmlab report">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""

_STYLE = """
body { margin: 0; background: #fff; color: #1f2328;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 1.6em; margin: 0.4em 0 0.1em; overflow-wrap: anywhere; }
h2 { font-size: 1.25em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.made, .note { color: #59636e; margin: 0.2em 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 3px 10px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; }
th { background: #f6f8fa; }
table.numeric td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: 4px; }
figure img { display: block; width: 100%; height: auto; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 10px;
  font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  white-space: pre-wrap; overflow-wrap: anywhere; margin: 0.4em 0; }
details { margin: 0.4em 0; }
summary { cursor: pointer; font-weight: 600; }
"""
