"""`lmlab experiment lora-vs-full --quick`: the lesson holds in the numbers it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmlab


@pytest.mark.slow
def test_lora_trains_a_small_share_and_both_methods_learn(tmp_path: Path):
    result = lmlab.run_experiment("lora-vs-full", tmp_path / "lf", quick=True, log=lambda *a: None)
    lora, full = result.results["methods"]["LoRA"], result.results["methods"]["full"]
    assert full["trainable_params"] == result.results["total_params"]
    assert 0 < lora["trainable_params"] < 0.1 * full["trainable_params"]
    for method in (lora, full):  # both fine-tunes learned FLOWROLL, from the same base
        assert method["val_loss_before"] == lora["val_loss_before"]
        assert method["val_loss_after"] < method["val_loss_before"] - 0.5
        assert method["step_time_s"] > 0 and method["peak_memory_bytes"] > 0
        assert 0.0 <= method["exact_match_after"] <= 1.0
    saved = json.loads((tmp_path / "lf" / "results.json").read_text())
    assert saved["results"]["methods"] == json.loads(json.dumps(result.results["methods"]))
    readme = (tmp_path / "lf" / "README.md").read_text()
    for number in (  # the README quotes this run's numbers
        f"LoRA trained {lora['trainable_params']:,} ({lora['trainable_fraction']:.1%})",
        f"to {lora['val_loss_after']:.3f} with LoRA and {full['val_loss_after']:.3f}",
        f"{lora['step_time_s'] * 1000:.0f} ms against {full['step_time_s'] * 1000:.0f} ms",
    ):
        assert number in readme
    assert "(val_loss.png)" in readme and "(costs.png)" in readme
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
