"""The notebooks in examples/: kept without outputs in the repository, and executed here (slow)
so that they never fall behind the API they call."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ("quickstart", "scaling_laws", "finetuning")
"""examples/NAME.ipynb, each executed by its own slow test below."""
CELL_TIMEOUT_S = 600
"""Per cell: each notebook takes about a minute in all on a quiet 2-core CPU; a busy CI
machine can be several times slower."""
NEEDS_DEV = "needs the dev extra: pip install -e '.[dev]'"
SKIPPED_FOLDERS = {"__pycache__", "node_modules", "build", "dist", "site"}


def _repo_notebooks() -> list[Path]:
    """Every .ipynb in the repository, outside hidden folders (.venv, .git) and build output."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [
            name for name in subfolders if not name.startswith(".") and name not in SKIPPED_FOLDERS
        ]
        found += [Path(folder) / name for name in files if name.endswith(".ipynb")]
    return sorted(found)


def _skip_reason(name: str) -> str | None:
    """Why a notebook cannot run yet: the experiment it calls is not in the table."""
    if name == "scaling_laws":
        from lmlab.experiments.common import EXPERIMENTS

        if "model-scaling" not in EXPERIMENTS:
            return "the model-scaling experiment is not in lmlab.experiments.common.EXPERIMENTS yet"
    return None


def test_every_example_notebook_has_its_test():
    assert sorted(p.stem for p in EXAMPLES.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("path", _repo_notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebooks_are_valid_and_stored_without_outputs(path: Path):
    nbformat = pytest.importorskip("nbformat", reason=NEEDS_DEV)
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {cell.id}: strip the outputs"
            assert cell.execution_count is None, f"{path.name} cell {cell.id}: execution count"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    nbformat = pytest.importorskip("nbformat", reason=NEEDS_DEV)
    nbclient = pytest.importorskip("nbclient", reason=NEEDS_DEV)
    # The kernel inherits this environment: offline, and torch's default thread count.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LMLAB_CPU_AUTO", "0")
    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    examples_before = sorted(EXAMPLES.rglob("*"))
    started = time.perf_counter()
    try:
        client.execute()  # a cell that raises fails the test with its traceback
    finally:
        nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")  # to read when it fails
    print(f"{name}.ipynb ran in {time.perf_counter() - started:.0f} s")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no plot was shown"
    # What it wrote went to its working directory, none of it beside the notebook.
    assert (tmp_path / "notebook-runs").is_dir()
    assert sorted(EXAMPLES.rglob("*")) == examples_before
