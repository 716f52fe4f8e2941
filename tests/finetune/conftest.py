"""Fixtures for fine-tuning tests: a small trained base model and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.config import build_config
from lmlab.train.loop import train


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="session")
def base_run(flowroll_data: Path, tmp_path_factory) -> Path:
    """A tiny LLaMA trained for a few steps on FLOWROLL (char tokenizer): a base to adapt."""
    runs = tmp_path_factory.mktemp("base_runs")
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={runs}",
            "model.context_length=64",
            "train.micro_batch_size=8",
            "train.max_steps=30",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.device=cpu",
            "eval.interval=0",
            "eval.batches=1",
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=quiet).run_dir


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    path = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": f"[{i} {i + 1}] | sort =>", "completion": f" [{i} {i + 1}]"} for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
