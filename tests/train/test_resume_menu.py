"""The resume-or-new menu of `lmlab train`, under a pseudo-terminal and without one."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.config import build_config
from lmlab.runs.folder import find_runs
from lmlab.runs.status import run_status
from lmlab.train.loop import train

pytestmark = pytest.mark.posix

SETTINGS = [
    "model.context_length=32",
    "train.micro_batch_size=4",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.device=cpu",
    "eval.interval=3",
    "eval.batches=1",
    "checkpoint.interval=3",
    "logging.tensorboard=false",
]


def stopped_run(data: Path, runs: Path) -> Path:
    cfg = build_config(
        "ultra-tiny", overrides=[f"data.path={data}", f"logging.runs_dir={runs}", *SETTINGS]
    )
    return train(cfg, stop_at_step=3, log=lambda *a, **k: None).run_dir


def command(data: Path, runs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmlab",
        "train",
        "--preset",
        "ultra-tiny",
        "--data",
        str(data),
        f"logging.runs_dir={runs}",
        *SETTINGS,
    ]


def run_in_terminal(argv: list[str], answer: str, timeout_s: float = 120) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as stdin/stdout/stderr; answer the menu's prompt."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    output, answered = b"", False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not answered and b"choice [r/n/d/q]" in output:
                os.write(controller, answer.encode() + b"\n")
                answered = True
        elif proc.poll() is not None:
            break
    rc = proc.wait(timeout=30)
    os.close(controller)
    return rc, output.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("answer", ["r", "n", "d", "q"])
def test_menu_in_a_terminal(answer: str, flowroll_data: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    old = stopped_run(flowroll_data, runs)
    rc, out = run_in_terminal(command(flowroll_data, runs), answer)
    assert "stopped before its end" in out and "step 3/6" in out and "val loss" in out, out
    all_runs = find_runs(runs, "ultra-tiny")
    if answer == "r":
        assert rc == 0 and all_runs == [old], out
        assert f"resuming {old}" in out and run_status(old)[0] == "finished"
    elif answer == "n":
        assert rc == 0 and len(all_runs) == 2 and old in all_runs, out
        assert run_status(old)[0] == "interrupted"
    elif answer == "d":
        assert rc == 0 and len(all_runs) == 1 and not old.exists(), out
        assert run_status(all_runs[0])[0] == "finished"
    else:
        assert rc == 1 and all_runs == [old] and run_status(old)[0] == "interrupted"


@pytest.mark.slow
def test_no_terminal_never_prompts(flowroll_data: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    old = stopped_run(flowroll_data, runs)
    done = subprocess.run(
        command(flowroll_data, runs), stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "choice" not in done.stdout and "stopped before its end" not in done.stdout
    assert len(find_runs(runs, "ultra-tiny")) == 2 and run_status(old)[0] == "interrupted"


@pytest.mark.slow
def test_new_flag_skips_the_menu_in_a_terminal(flowroll_data: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    stopped_run(flowroll_data, runs)
    rc, out = run_in_terminal([*command(flowroll_data, runs), "--new"], "q")
    assert rc == 0 and "choice" not in out, out
    assert len(find_runs(runs, "ultra-tiny")) == 2


@pytest.mark.slow
def test_finetune_offers_the_same_menu(flowroll_data: Path, tmp_path: Path):
    from lmlab.finetune.task import finetune

    runs = tmp_path / "runs"
    base = stopped_run(flowroll_data, runs)
    settings = [
        f"logging.runs_dir={runs}",
        "train.max_steps=6",
        "train.micro_batch_size=4",
        "train.device=cpu",
        "logging.tensorboard=false",
    ]
    cfg = build_config(
        "finetune-lora",
        overrides=[
            f"finetune.base={base}",
            "finetune.data=dsl:flowroll:200",
            "finetune.epochs=0",
            *settings,
        ],
    )
    old = finetune(cfg, stop_at_step=3, log=lambda *a, **k: None).run_dir
    argv = [
        sys.executable,
        "-m",
        "lmlab",
        "finetune",
        "--from",
        str(base),
        "--data",
        "dsl:flowroll:200",
        "--method",
        "lora",
        *settings,
    ]
    rc, out = run_in_terminal(argv, "r")
    assert rc == 0 and "stopped before its end" in out and f"resuming {old}" in out, out
    assert find_runs(runs, "finetune-lora") == [old] and run_status(old)[0] == "finished"
