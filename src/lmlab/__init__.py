"""lmlab: train language models end to end, from a folder of text to an evaluated model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def run_experiment(
    name: str,
    out: str | Path | None = None,
    *,
    quick: bool = False,
    log: Callable[..., None] = print,
    **options: Any,
):
    """Run a teaching experiment (`lmlab experiment NAME`); returns its results.

    The experiments live above the rest of the library (lmlab.experiments), so they are
    imported only when called."""
    import importlib

    common = importlib.import_module("lmlab.experiments.common")
    return common.run_experiment(name, out, quick=quick, log=log, **options)
