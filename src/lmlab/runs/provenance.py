"""Where a run or a measurement came from: the lmlab source commit."""

from __future__ import annotations

import subprocess
from pathlib import Path


def source_commit() -> str | None:
    """Short git commit of the lmlab source checkout, or None outside a checkout."""
    here = Path(__file__).resolve().parent  # the source checkout, wherever bench runs from
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
