"""Summaries of runs for `lmlab runs`: list, show, compare, delete and clean up.

Everything here reads what a run left on disk (config.yaml, metrics.jsonl, checkpoints,
status.json, run.lock) and never prints. Deleting is guarded twice: a run whose lock a
live process holds is refused, and this process holds the run's lock itself while it
deletes, so a trainer cannot start resuming a run that is half gone. A whole run is
renamed to a hidden name before it is removed (`lmlab.fileio.hide_directory`), so a
deletion cut short never leaves something that looks like a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from lmlab.config import Config, load_config
from lmlab.errors import UserError
from lmlab.fileio import hide_directory, remove_directory
from lmlab.runs.checkpoint import PREFIX, leftovers, list_checkpoints, read_meta
from lmlab.runs.folder import CONFIG_NAME, find_runs, is_run_dir
from lmlab.runs.lock import LOCK_NAME, RunLock, RunLockedError, lock_state, read_holder
from lmlab.runs.metrics import read_metrics, summarize, wall_time_s
from lmlab.runs.status import RunStatus, read_recorded, run_status

# What `atomic_directory`, `atomic_write_bytes` and `hide_directory` leave behind when a
# process dies in the middle: hidden names ending in one of these.


class RunIsRunningError(UserError):
    """The run a deletion was asked for is being trained by a live process."""


class CheckpointSummary(NamedTuple):
    """One complete checkpoint folder of a run."""

    name: str
    step: int
    val_loss: float | None
    disk_bytes: int


@dataclass
class RunSummary:
    """What `lmlab runs list` shows about one run, read back from its folder."""

    name: str
    """The run's name: the folder above the run id."""
    run_id: str
    """The run folder's own name (its start time, YYYYmmdd-HHMMSS[-N])."""
    path: Path
    """The run folder."""
    status: RunStatus
    """running / finished / interrupted / failed."""
    status_note: str
    """Why, in a few words ("" when there is nothing to add)."""
    steps_done: int
    """The last step logged (or checkpointed)."""
    steps_planned: int | None
    """train.max_steps of the run's config (None if the config cannot be read)."""
    tokens_seen: int | None
    """Training tokens seen up to steps_done."""
    best_val_loss: float | None
    last_val_loss: float | None
    last_loss: float | None
    """The last logged training loss."""
    wall_s: float
    """Wall-clock seconds spent training, over every invocation."""
    disk_bytes: int
    """Size of the whole run folder."""
    last_checkpoint: str | None
    """Folder name of the newest complete checkpoint."""
    checkpoints: list[CheckpointSummary] = field(default_factory=list)
    """Complete checkpoints, oldest first."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, checkpoints as objects."""
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["checkpoints"] = [c._asdict() for c in self.checkpoints]
        return d


@dataclass
class CleanItem:
    """One thing `lmlab runs clean` would remove."""

    path: Path
    kind: Literal["run", "leftover"]
    """A whole run folder, or a temporary file or folder a crash left behind."""
    reason: str
    disk_bytes: int


# -- reading ------------------------------------------------------------------------------


def disk_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (symbolic links count as themselves, not followed)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if os.path.lexists(path) else 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walk
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _checkpoint_summary(ckpt: Path) -> tuple[CheckpointSummary, dict[str, Any]]:
    try:
        meta = read_meta(ckpt)
    except (OSError, ValueError):  # a damaged meta.json: the folder name still says the step
        meta = {}
    step = meta.get("step", int(ckpt.name[len(PREFIX) :]))
    return CheckpointSummary(ckpt.name, step, meta.get("val_loss"), disk_bytes(ckpt)), meta


def summarize_run(run_dir: str | Path) -> RunSummary:
    """A run's summary from its config, metrics log, checkpoints and status."""
    run = Path(run_dir)
    try:
        steps_planned: int | None = load_config(run / CONFIG_NAME).train.max_steps
    except UserError:
        steps_planned = None
    metrics = summarize(read_metrics(run))
    found = [_checkpoint_summary(c) for c in list_checkpoints(run)]
    checkpoints = [summary for summary, _ in found]
    newest_meta = found[-1][1] if found else {}
    steps_done = max(metrics["step"], checkpoints[-1].step if checkpoints else 0)
    val_losses = [c.val_loss for c in checkpoints if c.val_loss is not None]
    status, note = run_status(run)
    legacy = status == "interrupted" and not read_recorded(run)  # from before status.json
    if legacy and steps_planned is not None and steps_done >= steps_planned:
        status = "finished"  # an older run that reached its last step
    return RunSummary(
        name=run.parent.name,
        run_id=run.name,
        path=run,
        status=status,
        status_note=note,
        steps_done=steps_done,
        steps_planned=steps_planned,
        # The metrics log first; the checkpoints' meta.json if it is missing or cut short.
        tokens_seen=_first(metrics["tokens_seen"], newest_meta.get("tokens_seen")),
        best_val_loss=_first(metrics["best_val_loss"], min(val_losses, default=None)),
        last_val_loss=_first(metrics["last_val_loss"], newest_meta.get("val_loss")),
        last_loss=metrics["last_loss"],
        wall_s=wall_time_s(run),
        disk_bytes=disk_bytes(run),
        last_checkpoint=checkpoints[-1].name if checkpoints else None,
        checkpoints=checkpoints,
    )


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def list_runs(runs_dir: str | Path, name: str | None = None) -> list[RunSummary]:
    """Summaries of every run under runs_dir (or of one name), sorted by name, then id."""
    return [summarize_run(run) for run in find_runs(runs_dir, name)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(configs: list[Config]) -> dict[str, list]:
    """{dotted key: [value in each config]} for the keys whose values are not all equal."""
    flat = [_flatten(cfg.to_dict()) for cfg in configs]
    keys = dict.fromkeys(key for tree in flat for key in tree)  # first-seen order
    differences = {}
    for key in keys:
        values = [tree.get(key) for tree in flat]
        if any(value != values[0] for value in values[1:]):
            differences[key] = values
    return differences


def resume_command(run_dir: str | Path) -> str:
    """The command line that continues the run (with --nproc when it trained in several
    processes)."""
    recorded = read_recorded(run_dir)
    world_size = recorded.get("world_size")
    nproc = f" --nproc {world_size}" if isinstance(world_size, int) and world_size > 1 else ""
    command = (
        recorded.get("command") if recorded.get("command") in ("train", "finetune") else "train"
    )
    return f"lmlab {command}{nproc} --resume {shlex.quote(str(run_dir))}"


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest val loss; the newest if none has one; None if no
    checkpoint."""
    ckpts = list_checkpoints(run_dir)
    losses = {path: _checkpoint_summary(path)[0].val_loss for path in ckpts}
    scored = [path for path in ckpts if losses[path] is not None]
    if scored:
        return min(scored, key=lambda path: losses[path])
    return ckpts[-1] if ckpts else None


# -- deleting -----------------------------------------------------------------------------


def deletion_targets(run_dir: str | Path, keep_best: bool = False) -> list[Path]:
    """What `delete_run` would remove: the run folder, or (keep_best) every checkpoint
    but the best."""
    run = Path(run_dir)
    if not keep_best:
        return [run]
    best = best_checkpoint(run)
    return [ckpt for ckpt in list_checkpoints(run) if ckpt != best]


def check_not_running(run_dir: str | Path) -> None:
    """Refuse, in one line, a run that a live process is training."""
    status, note = run_status(run_dir)
    if status == "running":
        raise RunIsRunningError(f"{run_dir} is running ({note}): stop it before deleting it")


@contextlib.contextmanager
def _locked_for_deletion(run: Path) -> Iterator[RunLock]:
    """Hold the run's lock (taking over a stale one) or refuse, in one line, if it runs."""
    try:
        lock = RunLock(run).acquire(wait_s=0.2)
    except RunLockedError:
        holder = read_holder(run)
        raise RunIsRunningError(
            f"{run} is running (process {holder.get('pid', '?')} on {holder.get('host', '?')}): "
            "stop it before deleting it"
        ) from None
    except OSError as e:  # e.g. a read-only folder
        raise UserError(f"cannot lock {run} to delete it: {e.strerror or e}") from None
    try:
        yield lock
    finally:
        lock.release()


def delete_run(run_dir: str | Path, keep_best: bool = False) -> int:
    """Delete a run that is not running; with keep_best, delete only its checkpoints but the
    best (config and metrics stay). Returns the bytes freed."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise UserError(f"{run} is not a run folder (it has no {CONFIG_NAME})")
    freed = 0 if keep_best else disk_bytes(run)  # as listed: before our lock file exists
    with _locked_for_deletion(run) as lock:
        if keep_best:
            for ckpt in deletion_targets(run, keep_best=True):
                size = disk_bytes(ckpt)
                _remove(remove_directory, ckpt)
                freed += size
            return freed
        hidden = _remove(hide_directory, run)
        # The lock file moved with the folder: releasing must not unlink a lock that a new
        # run folder of the same name might already have at the old path.
        lock.path = hidden / LOCK_NAME
        _remove(shutil.rmtree, hidden.parent)
    with contextlib.suppress(OSError):  # the name folder, once its last run is gone
        run.parent.rmdir()
    return freed


def _remove(action: Callable[[Path], Any], path: Path) -> Any:
    try:
        return action(path)
    except OSError as e:
        raise UserError(
            f"could not delete {path}: {e.strerror or e}; fix it, then `lmlab runs clean` "
            "removes what is left"
        ) from None


def clean_candidates(runs_dir: str | Path) -> list[CleanItem]:
    """What `lmlab runs clean` removes: temporary files and folders a crash left (in name
    folders, run folders and checkpoints/), and whole runs without a complete checkpoint.
    Running runs are left alone."""
    root = Path(runs_dir)
    items: list[CleanItem] = []
    names = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for parent in names:
        if not parent.name.startswith("."):
            items += [_leftover(p, "left by an unfinished deletion") for p in leftovers(parent)]
    for run in find_runs(root):
        if run_status(run)[0] == "running":
            continue  # its temporary folders may be a checkpoint being written right now
        if not list_checkpoints(run):
            items.append(CleanItem(run, "run", "no complete checkpoint", disk_bytes(run)))
            continue
        for folder in (run, run / "checkpoints"):
            items += [_leftover(p, "left by a crash while writing") for p in leftovers(folder)]
    return items


def _leftover(path: Path, reason: str) -> CleanItem:
    return CleanItem(path, "leftover", reason, disk_bytes(path))


def clean(items: list[CleanItem]) -> int:
    """Remove what `clean_candidates` found, skipping runs that started running since;
    returns the bytes freed."""
    freed = 0
    for item in items:
        if item.kind == "run":
            try:
                freed += delete_run(item.path)
            except RunIsRunningError:
                continue
        elif os.path.lexists(item.path):
            size = disk_bytes(item.path)
            if item.path.is_dir() and not item.path.is_symlink():
                _remove(shutil.rmtree, item.path)
            else:
                _remove(os.unlink, item.path)
            freed += size
    return freed


def running_runs(runs_dir: str | Path) -> list[Path]:
    """Runs under runs_dir whose lock a live process holds."""
    return [run for run in find_runs(runs_dir) if lock_state(run) == "held"]
