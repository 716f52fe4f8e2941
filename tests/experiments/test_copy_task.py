"""`lmlab experiment copy-task --quick`: the lesson holds in the numbers it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmlab
from lmlab.errors import UserError


@pytest.mark.slow
def test_copy_task_reaches_exact_copies(tmp_path: Path):
    result = lmlab.run_experiment("copy-task", tmp_path / "ct", quick=True, log=lambda *a: None)
    r = result.results
    scores = r["scores"]
    assert r["test_strings"] >= 100
    assert [s["step"] for s in scores] == sorted(s["step"] for s in scores)
    assert len(scores) >= 4 and scores[-1]["step"] == r["steps"]

    # the model learned to copy strings it never saw, whole
    assert r["final_exact_match"] == scores[-1]["exact_match"] >= 0.95
    assert r["final_symbol_accuracy"] >= 0.98
    assert scores[0]["exact_match"] < 0.5  # ... and it was learned along the way
    first = next(s["step"] for s in scores if s["exact_match"] > r["target"])
    assert r["first_step_above_target"] == first
    # the loss cannot go below the random halves' entropy; a model that copies gets near it
    assert r["loss_floor"] - 0.02 < r["final_val_loss"] < r["loss_floor"] + 0.2

    readme = (tmp_path / "ct" / "README.md").read_text()
    assert f"first exceeded 95% at step {first}" in readme
    assert f"ended at {r['final_exact_match']:.1%}" in readme
    saved = json.loads((tmp_path / "ct" / "results.json").read_text())
    assert saved["results"]["scores"] == json.loads(json.dumps(scores))
    assert "(accuracy.png)" in readme and "(loss.png)" in readme
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_copy_task_refuses_lines_longer_than_the_context(tmp_path: Path):
    with pytest.raises(UserError, match="must fit the context"):
        lmlab.run_experiment("copy-task", tmp_path, lengths="8-40", log=lambda *a: None)
