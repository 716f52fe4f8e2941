"""`lmlab experiment context-length --quick`: the lesson holds in the numbers it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmlab


@pytest.mark.slow
def test_a_longer_context_lowers_the_loss_at_the_same_tokens(tmp_path: Path):
    result = lmlab.run_experiment(
        "context-length", tmp_path / "cl", quick=True, log=lambda *a: None
    )
    runs = sorted(result.results["runs"].values(), key=lambda r: r["context"])
    assert [r["context"] for r in runs] == [1, 16, 256]
    assert {r["tokens_per_step"] for r in runs} == {result.results["tokens_per_step"]}
    shortest, longest = runs[0], runs[-1]
    assert longest["val_loss"] < shortest["val_loss"] - 0.1  # 256 characters beat a bigram
    for r in runs:
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
    # attention's share of the work grows with the window
    assert shortest["attention_flops_share"] < 0.05 < 0.3 < longest["attention_flops_share"]
    saved = json.loads((tmp_path / "cl" / "results.json").read_text())
    assert saved["results"]["runs"] == json.loads(json.dumps(result.results["runs"]))
    readme = (tmp_path / "cl" / "README.md").read_text()
    assert f"{longest['val_loss']:.3f} at 256" in readme  # the README quotes this run's numbers
    assert f"{shortest['val_loss'] - longest['val_loss']:.3f} below the shortest" in readme
    assert f"{longest['tokens_per_s']:,.0f} tokens/s at 256" in readme
    assert "(val_loss.png)" in readme and "(speed.png)" in readme
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
