"""CPU threads on a shared machine (issue 14, item 7): with train.cpu_threads=0 training
uses the cores other programs leave free, measured once at the start, and a resumed run
keeps the count it started with (bit-exact whatever the load is then)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.config import build_config
from lmlab.runs import cpu
from lmlab.runs.checkpoint import list_checkpoints, read_meta
from lmlab.train import setup
from lmlab.train.loop import train


def test_auto_threads_leaves_the_busy_cores():
    assert cpu.auto_threads(2, None) == 2
    assert cpu.auto_threads(2, 0.1) == 2
    assert cpu.auto_threads(2, 0.7) == 1
    assert cpu.auto_threads(2, 1.9) == 1  # at least one
    assert cpu.auto_threads(8, 3.2) == 5
    assert "other programs keep 1.0 of 2 cores busy" in cpu.describe(1, 2, 1.0)


@pytest.mark.posix
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_busy_cores_sees_a_busy_process():
    quiet = cpu.busy_cores(0.3)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = cpu.busy_cores(0.5)
    finally:
        hog.kill()
    assert quiet is not None and busy is not None
    assert busy > quiet + 0.6, (quiet, busy)


def test_a_run_records_its_threads_and_a_resume_keeps_them(
    flowroll_data: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("LMLAB_CPU_AUTO", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(setup, "_DEFAULT_THREADS", 2)
    monkeypatch.setattr(cpu, "_measured", [1.0])  # another program holds one core of two
    before = torch.get_num_threads()
    lines: list[str] = []
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path}",
            "train.max_steps=4",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    try:
        run = train(cfg, stop_at_step=2, log=lambda *a, **k: lines.append(str(a[0]))).run_dir
        assert "cpu fp32, 1 thread (other programs keep 1.0 of 2 cores busy)" in lines[0]
        assert read_meta(list_checkpoints(run)[-1])["cpu_threads"] == 1
        monkeypatch.setattr(cpu, "_measured", [0.0])  # quiet now: the run keeps its one thread
        lines.clear()
        train(cfg, resume=run, log=lambda *a, **k: lines.append(str(a[0])))
        assert any("cpu fp32, 1 thread |" in x for x in lines), lines
        assert read_meta(list_checkpoints(run)[-1])["cpu_threads"] == 1
    finally:
        torch.set_num_threads(before)
