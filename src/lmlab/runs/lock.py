"""One process trains in a run folder at a time: `RUN_DIR/run.lock`, held while it runs.

The lock is an `flock` on the file, which the kernel drops when the process ends however
it ends (Ctrl-C, crash, SIGKILL, power loss). The file also names the holder (PID, host,
start time) for people and for `lmlab runs`. Three states follow:

    held     a live process holds the flock: the run is running
    stale    the file is there but nobody holds it: the process died without cleaning up
    absent   no file: nobody has trained here, or the last process ended cleanly

A clean exit deletes the file; after taking the flock the holder checks that the file it
locked is still the one at the path, so a lock deleted under it is never trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Literal

from lmlab.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; an existing lock file counts as held
    fcntl = None

LOCK_NAME = "run.lock"
LockState = Literal["held", "stale", "absent"]


class RunLockedError(UserError):
    """Another live process is training in this run folder."""


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def read_holder(run_dir: str | Path) -> dict[str, Any]:
    """What the lock file says about its holder ({} if unreadable or absent)."""
    try:
        return json.loads(lock_path(run_dir).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def lock_state(run_dir: str | Path) -> LockState:
    """Whether a live process holds the run's lock, without disturbing it."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "absent"
    try:
        if fcntl is None:
            return "held"
        try:
            # A shared probe: it fails while the trainer holds its exclusive lock.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "held"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "stale"
    finally:
        os.close(fd)


class RunLock:
    """Hold `RUN_DIR/run.lock` for as long as this process trains there.

    `acquire` raises RunLockedError (one line) when another live process holds it; a stale
    lock left by a dead process is taken over.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self._fd: int | None = None

    def acquire(self, wait_s: float = 2.0) -> RunLock:
        # A `lmlab runs list` probe holds a shared lock for microseconds: retry briefly.
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                elif os.fstat(fd).st_size > 0:
                    raise BlockingIOError
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self._locked_error() from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was deleted or replaced while we waited: lock again
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # (os.pwrite would do both; Windows has none)
        os.write(fd, (json.dumps(info) + "\n").encode())
        return self

    def _locked_error(self) -> RunLockedError:
        holder = read_holder(self.run_dir)
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = f" since {holder['started_at']}" if "started_at" in holder else ""
        return RunLockedError(
            f"{self.run_dir} is being trained by {who}{since}; wait for it to finish or stop it "
            "(Ctrl-C saves a checkpoint) before resuming"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the flock: nobody can take a dead file
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
