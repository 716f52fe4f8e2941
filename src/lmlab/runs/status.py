"""A run's status, `RUN_DIR/status.json`, read together with its lock.

The trainer writes `running` when it starts, the step it reached at every checkpoint, and
`finished`, `interrupted` (Ctrl-C, SIGTERM, --stop-at-step) or `failed` (an error, with
its one-line message) when it ends. A process that is killed cannot write anything, so
the recorded status alone could say `running` forever; `run_status` therefore trusts the
lock (`lmlab.runs.lock`) for "is it running?" and reports a run whose process died as
`failed`, saying so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, get_args

from lmlab.config import load_config
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_json
from lmlab.runs.checkpoint import list_checkpoints, read_meta
from lmlab.runs.folder import CONFIG_NAME, find_runs
from lmlab.runs.lock import lock_state, read_holder

STATUS_NAME = "status.json"
STATUS_VERSION = 1
RunStatus = Literal["running", "finished", "interrupted", "failed"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)


def read_recorded(run_dir: str | Path) -> dict[str, Any]:
    """status.json as written ({} when absent or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_status(run_dir: str | Path, status: RunStatus, **fields: Any) -> None:
    """Record `status` (and any fields) atomically, keeping the fields written before."""
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}")
    data = read_recorded(run_dir)
    data.update(fields)
    data.update(
        version=STATUS_VERSION, status=status, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )
    atomic_write_json(Path(run_dir) / STATUS_NAME, data)


def run_status(run_dir: str | Path) -> tuple[RunStatus, str]:
    """(status, a short note) of a run, using the lock to tell running from dead."""
    state = lock_state(run_dir)
    recorded = read_recorded(run_dir)
    if state == "held":
        holder = read_holder(run_dir)
        return "running", f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    status = recorded.get("status")
    if status == "running" or state == "stale":
        holder = read_holder(run_dir)
        pid = holder.get("pid") or recorded.get("pid", "?")
        return "failed", f"process {pid} ended without closing the run (killed or crashed)"
    if status in RUN_STATUSES:
        return status, recorded.get("error") or ""
    return "interrupted", "no status recorded"


def resumable_run(runs_dir: str | Path, name: str) -> Path | None:
    """The newest run called `name`, if it stopped short of its last step, has a checkpoint
    to continue from and is not running now; else None."""
    runs = find_runs(runs_dir, name)
    if not runs:
        return None
    newest = max(runs, key=lambda run: run.name)
    ckpts = list_checkpoints(newest)
    if not ckpts or run_status(newest)[0] in ("running", "finished"):
        return None
    try:
        planned = load_config(newest / CONFIG_NAME).train.max_steps
    except UserError:
        return None
    return newest if read_meta(ckpts[-1])["step"] < planned else None
