"""The run lock, the run status and the metrics log, alone and through the trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.runs.lock import RunLock, RunLockedError, lock_state, read_holder
from lmlab.runs.metrics import read_metrics, summarize, wall_time_s
from lmlab.runs.status import read_recorded, resumable_run, run_status, write_status
from lmlab.train.loop import train

HOLD_LOCK = (
    "import sys, time\n"
    "from lmlab.runs.lock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def hold_lock_in_another_process(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.posix
def test_lock_states_live_stale_and_released(tmp_path: Path):
    assert lock_state(tmp_path) == "absent"
    proc = hold_lock_in_another_process(tmp_path)
    try:
        assert lock_state(tmp_path) == "held"
        assert read_holder(tmp_path)["pid"] == proc.pid
        with pytest.raises(RunLockedError, match=f"process {proc.pid}"):
            RunLock(tmp_path).acquire(wait_s=0.2)
    finally:
        kill(proc)
    # SIGKILL leaves the file behind, but nobody holds it: stale, and it can be taken over.
    assert lock_state(tmp_path) == "stale"
    with RunLock(tmp_path) as lock:
        assert lock.held and lock_state(tmp_path) == "held"
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert lock_state(tmp_path) == "absent"


def test_a_second_lock_in_the_same_process_is_refused(tmp_path: Path):
    with RunLock(tmp_path), pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire(wait_s=0.1)


def test_status_trusts_the_lock(tmp_path: Path):
    assert run_status(tmp_path) == ("interrupted", "no status recorded")
    write_status(tmp_path, "running", pid=123)
    status, note = run_status(tmp_path)  # says running, but nobody holds the lock: it died
    assert status == "failed" and "killed or crashed" in note
    write_status(tmp_path, "finished")
    assert run_status(tmp_path)[0] == "finished" and read_recorded(tmp_path)["pid"] == 123
    with RunLock(tmp_path):
        assert run_status(tmp_path)[0] == "running"
    with pytest.raises(ValueError):
        write_status(tmp_path, "paused")


def test_metrics_after_a_resume_drop_the_superseded_steps(tmp_path: Path):
    lines = [
        {"event": "start", "step": 0},
        {"step": 1, "loss": 3.0, "tokens_seen": 10, "elapsed_s": 1.0},
        {"step": 2, "val_loss": 2.5, "elapsed_s": 1.5},
        {"step": 3, "loss": 2.0, "tokens_seen": 30, "elapsed_s": 2.0},  # lost: no checkpoint
        {"event": "start", "step": 2},
        {"step": 3, "loss": 2.1, "tokens_seen": 30, "elapsed_s": 0.5},
        {"step": 4, "val_loss": 2.2, "elapsed_s": 0.7},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo'  # torn by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    history = read_metrics(tmp_path)
    assert [(r["step"], r.get("loss")) for r in history if "loss" in r] == [(1, 3.0), (3, 2.1)]
    summary = summarize(history)
    assert summary["step"] == 4 and summary["tokens_seen"] == 30
    assert summary["best_val_loss"] == 2.2 and summary["last_val_loss"] == 2.2
    assert wall_time_s(tmp_path) == pytest.approx(2.0 + 0.7)


def tiny(data: Path, runs: Path, *extra: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.max_steps=6",
            "train.warmup_steps=2",
            "train.device=cpu",
            "eval.interval=3",
            "eval.batches=1",
            "checkpoint.interval=3",
            "logging.interval=1",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def quiet(*args, **kwargs):
    pass


@pytest.mark.posix
def test_trainer_records_status_and_refuses_a_run_that_is_training(
    flowroll_data: Path, tmp_path: Path
):
    cfg = tiny(flowroll_data, tmp_path / "runs")
    first = train(cfg, stop_at_step=3, log=quiet)
    run = first.run_dir
    assert run_status(run)[0] == "interrupted" and lock_state(run) == "absent"
    assert resumable_run(tmp_path / "runs", "ultra-tiny") == run

    proc = hold_lock_in_another_process(run)  # as a training process would
    try:
        with pytest.raises(UserError, match=f"being trained by process {proc.pid}"):
            train(cfg, resume=run, log=quiet)
        assert run_status(run)[0] == "running"
        assert resumable_run(tmp_path / "runs", "ultra-tiny") is None
    finally:
        kill(proc)
    assert run_status(run)[0] == "failed"  # the holder died without closing the run

    resumed = train(cfg, resume=run, log=quiet)
    assert resumed.state.step == 6 and run_status(run) == ("finished", "")
    assert lock_state(run) == "absent"
    assert resumable_run(tmp_path / "runs", "ultra-tiny") is None
    recorded = read_recorded(run)
    assert recorded["step"] == 6 and recorded["world_size"] == 1
    assert summarize(read_metrics(run))["step"] == 6


def test_a_failing_run_is_recorded_as_failed(flowroll_data: Path, tmp_path: Path, monkeypatch):
    cfg = tiny(flowroll_data, tmp_path / "runs")
    from lmlab.train import loop

    def broken(self, val_loss):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop.Trainer, "save", broken)
    with pytest.raises(OSError):
        train(cfg, log=quiet)
    (run,) = (tmp_path / "runs" / "ultra-tiny").iterdir()
    status, note = run_status(run)
    assert status == "failed" and "No space left on device" in note
    assert lock_state(run) == "absent"


@pytest.mark.posix
def test_lock_wait_is_short(tmp_path: Path):
    proc = hold_lock_in_another_process(tmp_path)
    try:
        started = time.perf_counter()
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire(wait_s=0.3)
        assert time.perf_counter() - started < 2
    finally:
        kill(proc)
