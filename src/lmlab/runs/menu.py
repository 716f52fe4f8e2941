"""The resume-or-new menu that `lmlab train` and `lmlab finetune` show in a terminal when
the newest run of the same name stopped before its end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmlab.config import Config, load_config
from lmlab.runs.catalog import delete_run
from lmlab.runs.metrics import read_metrics, summarize
from lmlab.runs.status import resumable_run, run_status


def interactive() -> bool:
    """A person at a terminal (never CI, a pipe, or a torchrun worker)."""
    return sys.stdin.isatty() and sys.stdout.isatty() and "RANK" not in os.environ


def resume_or_new(cfg: Config) -> Path | str | None:
    """The resume-or-new menu, when a resumable run of the same name exists.

    Returns the run to resume, "quit", or None to start a new run.
    """
    name = cfg.logging.name or "run"
    run = resumable_run(cfg.logging.runs_dir, name)
    if run is None:
        return None
    summary = summarize(read_metrics(run))
    status, note = run_status(run)
    planned = load_config(run / "config.yaml").train.max_steps
    val = summary["last_val_loss"]
    print(
        f"A run named {name!r} stopped before its end: {run}\n"
        f"  {status}{f' ({note})' if note else ''}, step {summary['step']:,}/{planned:,}"
        + (f", val loss {val:.4f}" if val is not None else "")
        + "\n  [r] resume it\n  [n] start a new run (keep the old one)"
        "\n  [d] delete the old run and start again\n  [q] quit",
        flush=True,
    )
    while True:
        try:
            answer = input("choice [r/n/d/q] (r): ").strip().lower() or "r"
        except EOFError:
            return "quit"
        if answer in ("r", "resume"):
            return run
        if answer in ("n", "new"):
            return None
        if answer in ("d", "delete"):
            delete_run(run)
            print(f"deleted {run}", flush=True)
            return None
        if answer in ("q", "quit"):
            return "quit"
        print("please answer r, n, d or q", flush=True)
