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

pytestmark = pytest.mark.posix

# A command module whose import gets a Ctrl-C and swallows the KeyboardInterrupt, as torch's
# C start-up does when the numpy it imports is interrupted (then it goes on without numpy).
SWALLOWING_MODULE = """
import os, signal, time
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    pass

def main(argv):
    print("the command ran")
    return 0
"""

CALLER = """
import sys
sys.path.insert(0, sys.argv[1])
from lmlab import cli
cli.COMMANDS["swallows"] = "a command whose import swallows Ctrl-C"
cli.command_module = lambda name: "swallowing_module"
cli.main(["swallows"])
"""


def test_ctrl_c_while_a_command_imports_ends_it_even_if_a_library_swallows_it(tmp_path: Path):
    (tmp_path / "swallowing_module.py").write_text(SWALLOWING_MODULE)
    job = subprocess.run(
        [sys.executable, "-c", CALLER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "the command ran" not in job.stdout
    assert job.returncode == 130, (job.returncode, job.stdout, job.stderr)
    assert job.stderr == "lmlab swallows: interrupted\n"


@pytest.mark.slow
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
