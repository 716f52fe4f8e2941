"""`lmlab plot`: one metric of one or more runs as a PNG, one line per run."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  lmlab plot tiny                                        # val_loss of the newest run named tiny
  lmlab plot lr-3e-3 lr-1e-3 --metric loss --out loss.png --log-y
  lmlab plot tiny/20261123-101500 --metric tokens_per_s --x elapsed

RUN is a run folder, NAME/RUN_ID or RUN_ID under --runs-dir, or NAME (its newest run).
METRIC is any number the run logged in metrics.jsonl: loss, val_loss, lr, grad_norm,
tokens_per_s, val_perplexity, val_bits_per_byte, ... (a wrong name lists them). --x
elapsed is wall-clock seconds over all the run's invocations. Needs matplotlib:
pip install 'lmlab[export]'."""


def main(argv: list[str]) -> int:
    """Run `lmlab plot ARGV...`; bad input raises UserError."""
    from lmlab.report.curves import HEIGHT_PX, WIDTH_PX, X_AXES

    parser = argparse.ArgumentParser(
        prog="lmlab plot",
        description="Plot one metric of one or more runs into a PNG, one line per run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--metric", "-m", default="val_loss", help="default: val_loss")
    parser.add_argument("--out", "-o", default="curves.png", help="default: curves.png")
    parser.add_argument("--x", choices=X_AXES, default="step", help="the x axis (default: step)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--width", type=int, default=WIDTH_PX, help=f"pixels ({WIDTH_PX})")
    parser.add_argument("--height", type=int, default=HEIGHT_PX, help=f"pixels ({HEIGHT_PX})")
    parser.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="where runs are (default: runs)"
    )
    args = parser.parse_args(argv)

    from lmlab.errors import UserError
    from lmlab.report.curves import plot_metric, read_history, run_labels

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name a .png file")
    if not (100 <= args.width <= 10000 and 100 <= args.height <= 10000):
        raise UserError("--width and --height are pixels between 100 and 10000")
    runs = _resolve_all(args.runs, args.runs_dir)
    histories = {
        label: read_history(run) for label, run in zip(run_labels(runs), runs, strict=True)
    }
    plot_metric(
        histories,
        args.metric,
        x=args.x,
        log_y=args.log_y,
        out=out,
        width_px=args.width,
        height_px=args.height,
    )
    print(f"wrote {out} ({args.width}x{args.height}): {args.metric} of {len(runs)} run(s)")
    return 0


def _resolve_all(specs: list[str], runs_dir: str) -> list[Path]:
    """The runs named, each once however it was named."""
    from lmlab.runs.folder import resolve_run

    runs: dict[Path, Path] = {}
    for spec in specs:
        run = resolve_run(spec, runs_dir)
        runs.setdefault(run.resolve(), run)
    return list(runs.values())
