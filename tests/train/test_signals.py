"""Ctrl-C at any moment of start-up ends cleanly (issue 14, item 6): a real `lmlab train`
gets SIGINT at random moments from importing to the first steps; each time the exit status
is 130 and stderr holds no traceback. Every other attempt waits for the first progress
line, so training is hit too, and then the run saves a checkpoint on the way out."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.posix]


def test_ctrl_c_during_start_up_never_gives_a_traceback(flowroll_data: Path, tmp_path: Path):
    rng = random.Random(6)
    for attempt in range(12):
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmlab",
                "train",
                *("--preset", "ultra-tiny", "--data", str(flowroll_data)),
                f"logging.runs_dir={tmp_path / str(attempt)}",
                "train.max_steps=100000",
                "train.device=cpu",
                "logging.tensorboard=false",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        in_training = attempt % 2 == 1
        if in_training:  # the first progress line: the loop is running
            while (line := job.stdout.readline()) and not line.startswith("step 10/"):
                pass
        else:  # somewhere in importing, set-up or the first steps
            time.sleep(rng.uniform(0.3, 4.0))
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=120)
        assert "Traceback" not in err, err
        assert job.returncode == 130, (job.returncode, out, err)
        if in_training:
            assert "checkpoint saved" in out, out
