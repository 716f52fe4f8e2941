"""Run folders: runs/<name>/<run-id>/ with config.yaml, metrics.jsonl and checkpoints/."""

from __future__ import annotations

import time
from pathlib import Path

from lmlab.errors import UserError


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """A fresh folder runs_dir/name/YYYYmmdd-HHMMSS[-N]."""
    parent = Path(runs_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a run folder under {parent}")


def latest_run(runs_dir: str | Path, name: str | None = None) -> Path:
    """The most recently modified run under runs_dir (optionally under runs_dir/name) that
    has a complete checkpoint to resume from."""
    root = Path(runs_dir) / name if name else Path(runs_dir)
    candidates = [
        p.parent for p in root.glob("**/config.yaml") if p.parent.parent.name != "checkpoints"
    ]
    candidates = [
        p
        for p in candidates
        if "checkpoints" not in p.parts[len(root.parts) :]
        and any((p / "checkpoints").glob("step_*/meta.json"))
    ]
    if not candidates:
        raise UserError(f"no runs with a checkpoint found under {root} to resume")
    return max(
        candidates,
        key=lambda p: (
            (p / "metrics.jsonl").stat().st_mtime
            if (p / "metrics.jsonl").exists()
            else p.stat().st_mtime
        ),
    )
