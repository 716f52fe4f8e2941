"""Run folders: RUNS_DIR/NAME/RUN_ID/ holding everything one run leaves on disk.

    config.yaml        the resolved config (rewritten on resume with the settings changed)
    tokenizer.json     the data's tokenizer
    metrics.jsonl      the metrics log (lmlab.runs.metrics)
    status.json        running / finished / interrupted / failed (lmlab.runs.status)
    run.lock           held while a process trains here (lmlab.runs.lock)
    checkpoints/       step_NNNNNNNN/ folders (lmlab.runs.checkpoint)
    tensorboard/       TensorBoard events, when the package is installed

The run id is the start time, YYYYmmdd-HHMMSS (with -N when two runs start in the same
second).
"""

from __future__ import annotations

import time
from pathlib import Path

from lmlab.errors import UserError

CONFIG_NAME = "config.yaml"


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """A fresh folder runs_dir/name/YYYYmmdd-HHMMSS[-N]."""
    parent = Path(runs_dir) / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot make run folders under {runs_dir}: it is not a folder") from None
    except PermissionError:
        raise UserError(f"cannot make run folders under {runs_dir}: permission denied") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a run folder under {parent}")


def is_run_dir(path: str | Path) -> bool:
    """A folder a training run made (it has a config.yaml and is not a checkpoint)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and path.parent.name != "checkpoints"


def find_runs(runs_dir: str | Path, name: str | None = None) -> list[Path]:
    """Run folders RUNS_DIR/NAME/RUN_ID (of one name, or all), sorted by name, then id."""
    root = Path(runs_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a folder of runs: pass the folder (--runs-dir)")
    names = [root / name] if name else sorted(p for p in root.glob("*") if p.is_dir())
    return [
        run
        for parent in names
        if parent.is_dir() and not parent.name.startswith(".")
        for run in sorted(parent.iterdir())
        if run.is_dir() and not run.name.startswith(".") and is_run_dir(run)
    ]


def has_checkpoint(run_dir: str | Path) -> bool:
    return any(Path(run_dir).glob("checkpoints/step_*/meta.json"))


def latest_run(runs_dir: str | Path, name: str | None = None) -> Path:
    """The most recently active run under runs_dir (optionally of one name) that has a
    complete checkpoint to resume from."""
    candidates = [run for run in find_runs(runs_dir, name) if has_checkpoint(run)]
    if not candidates:
        root = Path(runs_dir) / name if name else Path(runs_dir)
        raise UserError(f"no runs with a checkpoint found under {root} to resume")
    return max(candidates, key=_last_active)


def _last_active(run: Path) -> float:
    metrics = run / "metrics.jsonl"
    return metrics.stat().st_mtime if metrics.exists() else run.stat().st_mtime


def resolve_run(spec: str | Path, runs_dir: str | Path = "runs") -> Path:
    """A run given as a path, NAME/RUN_ID or RUN_ID under runs_dir, or NAME (its newest run)."""
    path = Path(spec)
    if is_run_dir(path):
        return path
    if path.exists():
        raise UserError(f"{path} is not a run folder (it has no {CONFIG_NAME})")
    root = Path(runs_dir)
    if is_run_dir(root / path):
        return root / path
    by_id = [run for run in find_runs(root) if run.name == str(spec)]
    if len(by_id) == 1:
        return by_id[0]
    if len(by_id) > 1:
        raise UserError(
            f"run id {spec} exists under several names ({', '.join(r.parent.name for r in by_id)}): "
            "pass NAME/RUN_ID"
        )
    of_name = find_runs(root, str(spec)) if "/" not in str(spec) else []
    if of_name:
        return max(of_name, key=lambda r: r.name)
    raise UserError(f"no run {spec!r} under {root} (see `lmlab runs list --runs-dir {root}`)")
