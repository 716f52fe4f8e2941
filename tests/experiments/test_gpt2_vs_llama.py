"""`lmlab experiment gpt2-vs-llama --quick`: the lesson holds in the numbers it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmlab


@pytest.mark.slow
def test_gpt2_vs_llama_compares_matched_families(tmp_path: Path):
    result = lmlab.run_experiment("gpt2-vs-llama", tmp_path / "gl", quick=True, log=lambda *a: None)
    r = result.results
    runs = r["runs"]
    assert set(runs) == {"gpt2", "llama"}
    assert all(len(family) == len(r["seeds"]) >= 1 for family in runs.values())

    # matched sizes: within 5% of each other
    gpt2_params, llama_params = runs["gpt2"][0]["params"], runs["llama"][0]["params"]
    assert abs(gpt2_params - llama_params) / min(gpt2_params, llama_params) < 0.05

    # every run learned: val loss fell well below where it started (~ln 68 = 4.2)
    for family in runs.values():
        for run in family:
            assert run["val_loss"] < run["initial_val_loss"] - 1.0
            assert run["tokens_per_s"] > 0

    # the verdict is the one the numbers give
    mean = {f: sum(x["val_loss"] for x in rs) / len(rs) for f, rs in runs.items()}
    winner = min(mean, key=mean.get)
    loser = max(mean, key=mean.get)
    spread = max(
        max(x["val_loss"] for x in rs) - min(x["val_loss"] for x in rs) for rs in runs.values()
    )
    assert r["winner"] == winner
    assert r["margin"] == pytest.approx(mean[loser] - mean[winner])
    assert r["beyond_noise"] == (len(r["seeds"]) > 1 and mean[loser] - mean[winner] > spread)
    readme = (tmp_path / "gl" / "README.md").read_text()
    name = {"gpt2": "GPT-2", "llama": "LLaMA"}
    assert f"{name[winner]} ended lower, by {r['margin']:.3f}" in readme
    assert ("larger than the noise" in readme) == r["beyond_noise"]
    assert ("within run-to-run noise" in readme) == (not r["beyond_noise"])
    assert f"GPT-2 has {gpt2_params:,} parameters and LLaMA {llama_params:,}" in readme

    saved = json.loads((tmp_path / "gl" / "results.json").read_text())
    assert saved["results"]["runs"] == json.loads(json.dumps(runs))
    assert "(curves.png)" in readme
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
