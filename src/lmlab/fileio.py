"""Atomic writes: a crash, a kill or a full disk never leaves a half-written file or folder.

Everything lmlab writes goes to a temporary name in the same directory first and is then
renamed into place (a rename within one filesystem is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not all platforms allow opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _usual_mode(bits: int) -> int:
    """The permissions a new file (0o666) or folder (0o777) gets under the process umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return bits & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # Windows before Python 3.13 has none (and no modes)
            os.fchmod(fd, _usual_mode(0o666))  # mkstemp's file is private (0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON (indented, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to `target` only on success.

    On any exception the temporary directory is removed and `target` is left as it was.
    With `overwrite`, an existing `target` is replaced only after the new one is complete.
    """
    target = Path(target)
    made = _make_parents(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        # mkdtemp makes the folder private (0700); the finished one gets a new folder's
        # usual permissions, as `mkdir` would give it.
        os.chmod(tmp, _usual_mode(0o777))
    except BaseException:
        _remove_made(made)
        raise
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)  # the folders made for it, too: a failure leaves nothing behind
        raise
    _fsync_dir(tmp)
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(target)
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, trash / "old")
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    missing.reverse()
    for path in missing:
        path.mkdir(exist_ok=True)
    return missing


def _remove_made(made: list[Path]) -> None:
    """Remove folders `_make_parents` created, innermost first, if they are still empty."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.rmdir()


def hide_directory(path: str | Path) -> Path:
    """Rename a directory to a hidden temporary folder beside it and return its new path.

    The new path is `.NAME.XXXX.old/NAME` in the same folder (like `atomic_directory`'s
    leftovers), so nothing that lists folders by name sees it any more.
    """
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, trash / path.name)
    _fsync_dir(path.parent)
    return trash / path.name


def remove_directory(path: str | Path) -> None:
    """Delete a directory so that it is never seen half-deleted under its own name: hidden
    first (`hide_directory`), then removed; a crash in between leaves only the hidden folder."""
    shutil.rmtree(hide_directory(path).parent)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return file_digest(path, "sha256", chunk_bytes)


def file_digest(path: str | Path, algorithm: str = "sha256", chunk_bytes: int = 1 << 22) -> str:
    """Hex digest of a file, read in chunks, by any hashlib algorithm name."""
    import hashlib

    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
