"""`lmlab report`: one self-contained HTML report of one or more runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  lmlab report tiny                                  # the newest run named tiny
  lmlab report lr-3e-3 lr-1e-3 --out sweep.html      # two runs on the same axes
  lmlab report runs/shakespeare/20261123-101500 --prompt "ROMEO:" --prompt "JULIET:"
  lmlab report tiny --no-samples

RUN is a run folder, NAME/RUN_ID or RUN_ID under --runs-dir, or NAME (its newest run).
The page holds the curves (train and val loss, learning rate, tokens/s, gradient norm),
the last and best eval metrics, samples from each run's newest checkpoint, and each run's
config. Images are inlined and nothing is fetched: the one file is the whole report.
Needs matplotlib: pip install 'lmlab[export]'."""


def main(argv: list[str]) -> int:
    """Run `lmlab report ARGV...`; bad input raises UserError."""
    parser = argparse.ArgumentParser(
        prog="lmlab report",
        description="Write one self-contained HTML report of runs: curves, metrics, samples "
        "and configs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument(
        "--out", "-o", default="report.html", help="the HTML file (default: report.html)"
    )
    parser.add_argument("--title", default="", help="the page's title (default: the run names)")
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="prompt for the samples (repeatable; default: the start of the run's val data, "
        "or a new document)",
    )
    parser.add_argument(
        "--samples", type=int, default=2, metavar="N", help="samples per prompt (default: 2)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per sample (default: 64)")
    parser.add_argument("--no-samples", action="store_true", help="generate no samples")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (for samples)")
    parser.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="where runs are (default: runs)"
    )
    args = parser.parse_args(argv)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from lmlab.errors import UserError
    from lmlab.report.html import ReportOptions, write_report
    from lmlab.runs.device import select_device

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name an .html file")
    if args.samples < 1 or args.max_new_tokens < 1:
        raise UserError("--samples and --max-new-tokens must be at least 1")
    runs = _resolve_all(args.runs, args.runs_dir)
    options = ReportOptions(
        title=args.title,
        samples=not args.no_samples,
        prompts=args.prompt,
        samples_per_prompt=args.samples,
        max_new_tokens=args.max_new_tokens,
        device=str(select_device(args.device)) if not args.no_samples else "cpu",
    )
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # a progress line for a person at a terminal; nothing in a log or a pipe
    with Progress(*columns, transient=True, disable=not sys.stdout.isatty()) as progress:
        task = progress.add_task("samples", total=None)

        def on_progress(label: str, done: int, total: int) -> None:
            progress.update(task, description=f"samples {label}", completed=done, total=total)

        report = write_report(runs, out, options, on_progress)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    size_kb = out.stat().st_size / 1024
    print(
        f"wrote {out} ({size_kb:,.0f} KB): {len(runs)} run(s), {len(report.figures)} figure(s), "
        f"{report.samples} sample(s)"
    )
    return 0


def _resolve_all(specs: list[str], runs_dir: str) -> list[Path]:
    """The runs named, each once however it was named."""
    from lmlab.runs.folder import resolve_run

    runs: dict[Path, Path] = {}
    for spec in specs:
        run = resolve_run(spec, runs_dir)
        runs.setdefault(run.resolve(), run)
    return list(runs.values())
