"""The fine-tuning workshop end to end, on a tiny budget (the real numbers are in docs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.experiments.workshop import run_workshop
from lmlab.runs.status import run_status


@pytest.mark.slow
def test_workshop_runs_end_to_end(tmp_path: Path):
    lines: list[str] = []
    summary = run_workshop(
        tmp_path / "ws",
        base_steps=20,
        finetune_steps=10,
        programs=300,
        test_programs=4,
        log=lines.append,
    )
    lora, full = summary["lora"], summary["full"]
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert lora["step_time_s"] > 0 and full["peak_memory_bytes"] > 0
    for method in (lora, full):
        assert run_status(Path(method["run_dir"]))[0] == "finished"
        assert 0.0 <= method["exact_match"] <= 1.0
    text = "\n".join(lines)
    assert (
        "$ lmlab finetune --from" in text
        and "exact match" in text
        and "trainable parameters" in text
    )
