"""train.epochs and train.warmup_fraction: step counts derived from the data, saved as
plain steps; the start-up line says tokens per parameter and epochs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmlab.config import build_config, load_config
from lmlab.data.shards import load_manifest
from lmlab.errors import UserError
from lmlab.train.loop import train


def config(data: Path, runs: Path, *overrides: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "eval.interval=0",
            "eval.batches=1",
            "logging.tensorboard=false",
            *overrides,
        ],
    )


def test_epochs_set_the_steps_from_the_data(flowroll_data: Path, tmp_path: Path):
    lines: list[str] = []
    cfg = config(flowroll_data, tmp_path, "train.epochs=0.02", "train.warmup_fraction=0.25")
    result = train(cfg, log=lambda msg="", **k: lines.append(str(msg)))
    tokens = load_manifest(flowroll_data)["splits"]["train"]["tokens"]
    steps = math.ceil(0.02 * tokens / (4 * 32))
    assert result.state.step == steps
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.train.max_steps == steps and saved.train.epochs == 0
    assert saved.train.warmup_steps == round(0.25 * steps) and saved.train.warmup_fraction == 0
    assert any(f"0.02 epoch(s) of {tokens:,} tokens = {steps:,} steps" in line for line in lines)
    [start] = [line for line in lines if "tokens/param" in line]
    assert f"= {steps * 128:,} tokens" in start and " epochs" in start


@pytest.mark.parametrize(
    "override, message",
    [("train.epochs=-1", "train.epochs"), ("train.warmup_fraction=1.5", "warmup_fraction")],
)
def test_bad_values(flowroll_data: Path, tmp_path: Path, override: str, message: str):
    with pytest.raises(UserError, match=message):
        train(config(flowroll_data, tmp_path, override), log=lambda *a, **k: None)
