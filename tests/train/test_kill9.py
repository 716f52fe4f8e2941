"""kill -9 at random moments, checkpoint writes included, then resume (issue 14, item 8).

A real `lmlab train` process is killed six times: three times a random moment after it has
saved a checkpoint, three times the moment a checkpoint folder is being written (its
temporary folder has appeared). Each time the run is resumed. Before the last resume a bit
of the newest checkpoint is flipped, so resuming must fall back to the one before. The run
must end with weights bit-identical to a run that never stopped, no temporary folders,
and a metrics history without repeated steps.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.runs.checkpoint import list_checkpoints
from lmlab.runs.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.posix]

SETTINGS = [
    "--preset",
    "ultra-tiny",
    "model.context_length=32",
    "train.micro_batch_size=4",
    "train.max_steps=60",
    "train.warmup_steps=5",
    "train.device=cpu",
    "train.cpu_threads=1",
    "eval.interval=20",
    "eval.batches=2",
    "checkpoint.interval=3",
    "checkpoint.keep_last=2",
    "logging.interval=3",
    "logging.tensorboard=false",
]


def lmlab(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmlab", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def newest_step(run: Path) -> int:
    ckpts = list_checkpoints(run)
    return int(ckpts[-1].name.split("_")[1]) if ckpts else -1


def writing(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def test_kill9_at_random_moments_then_resume_is_bit_exact(flowroll_data: Path, tmp_path: Path):
    data = ["--data", str(flowroll_data)]
    finish(lmlab("train", *data, *SETTINGS, f"logging.runs_dir={tmp_path / 'straight'}"))
    (straight,) = (tmp_path / "straight").glob("*/*")

    rng = random.Random(14)
    runs = tmp_path / "killed"
    proc = lmlab("train", *data, *SETTINGS, f"logging.runs_dir={runs}")
    run: Path | None = None
    kills = 0
    for attempt in range(6):
        during_save = attempt % 2 == 1
        deadline = time.monotonic() + 300
        start_step = newest_step(run) if run else -1
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(runs.glob("*/*"))
            run = found[0] if found else None
            if run is not None:
                if during_save and newest_step(run) > start_step and writing(run):
                    break
                if not during_save and newest_step(run) > start_step:
                    time.sleep(rng.uniform(0.0, 0.4))
                    break
            time.sleep(0.001)
        if proc.poll() is not None:
            break  # it finished before this kill: the last ones are not needed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert run is not None and list_checkpoints(run), "killed before a first checkpoint"
        proc = lmlab("train", "--resume", str(run))
    finish(proc)
    assert kills >= 5

    # A flipped bit in the newest checkpoint: resuming falls back to the previous one.
    assert run is not None
    proc = lmlab("train", "--resume", str(run), "train.max_steps=90")
    while newest_step(run) < 72 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = list_checkpoints(run)[-1]
    raw = bytearray((newest / "model.safetensors").read_bytes())
    raw[-7] ^= 0x10
    (newest / "model.safetensors").write_bytes(bytes(raw))
    out = finish(lmlab("train", "--resume", str(run)))
    assert f"{newest.name} fails its integrity check" in out, out
    finish(lmlab("train", "--resume", str(straight), "train.max_steps=90"))

    a, b = weights(straight), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(3, 91, 3))
