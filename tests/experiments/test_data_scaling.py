"""`lmlab experiment data-scaling --quick`: more distinct data, lower reachable val loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmlab


@pytest.mark.slow
def test_data_scaling_more_data_reaches_a_lower_val_loss(tmp_path: Path):
    result = lmlab.run_experiment("data-scaling", tmp_path / "ds", quick=True, log=lambda *a: None)
    runs = result.results["runs"]
    assert [r["fraction"] for r in runs] == [0.003, 0.03, 1.0]
    assert all(r["params"] == runs[0]["params"] for r in runs)  # the same model every time
    for smaller, larger in zip(runs, runs[1:], strict=False):
        assert larger["train_tokens"] > smaller["train_tokens"]
        assert larger["best_val_loss"] < smaller["best_val_loss"] - 0.05
    small, large = runs[0], runs[-1]
    # the smallest share turns up (overfits) or levels off; the full text is still learning
    assert small["rise"] > 0.05 or small["late_drop"] < 0.5 * large["late_drop"]
    assert small["ending"] in ("turned up", "levelled off") and large["ending"] == "still falling"
    assert small["best_at_tokens"] < result.results["tokens"]
    assert large["late_drop"] > 0.03 and large["rise"] < 0.01
    assert small["epochs"] > 30 > 1 > large["epochs"]
    curves = result.results["curves"]
    assert len(curves) == 3 and all(c[-1][0] == result.results["tokens"] for c in curves.values())
    saved = json.loads((tmp_path / "ds" / "results.json").read_text())
    assert saved["results"]["runs"] == json.loads(json.dumps(runs))
    readme = (tmp_path / "ds" / "README.md").read_text()
    assert f"to {large['best_val_loss']:.3f} on 100%" in readme  # quotes this run's numbers
    assert "(curves.png)" in readme and "(best.png)" in readme
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
