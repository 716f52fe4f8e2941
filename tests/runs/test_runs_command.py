"""`lmlab runs`: list, show, compare, delete and clean, on run folders the tests write."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.cli import main as cli_main
from lmlab.commands.runs import main as runs_main
from lmlab.config import build_config, save_config
from lmlab.errors import UserError
from lmlab.runs.catalog import (
    clean_candidates,
    config_differences,
    delete_run,
    disk_bytes,
    list_runs,
    resume_command,
    summarize_run,
)
from lmlab.runs.checkpoint import list_checkpoints, save_checkpoint
from lmlab.runs.folder import find_runs
from lmlab.runs.lock import RunLock, read_holder
from lmlab.runs.status import write_status

TOKENS_PER_STEP = 128


def make_run(
    runs: Path,
    name: str,
    run_id: str,
    *,
    steps_done: int,
    max_steps: int = 10,
    checkpoints: dict[int, float | None] | None = None,
    status: str | None = None,
    overrides: tuple[str, ...] = (),
    **status_fields,
) -> Path:
    """A run folder as the trainer leaves it: config, metrics, checkpoints, status."""
    run = runs / name / run_id
    run.mkdir(parents=True)
    cfg = build_config(
        "ultra-tiny",
        overrides=[f"train.max_steps={max_steps}", f"logging.runs_dir={runs}", *overrides],
    )
    save_config(cfg, run / "config.yaml")
    (run / "tokenizer.json").write_text("{}", encoding="utf-8")
    checkpoints = checkpoints or {}
    lines = [{"event": "start", "step": 0}]
    for step in range(1, steps_done + 1):
        lines.append(
            {
                "step": step,
                "loss": 4.0 - 0.1 * step,
                "tokens_seen": step * TOKENS_PER_STEP,
                "elapsed_s": 2.0 * step,
            }
        )
        if checkpoints.get(step) is not None:
            lines.append({"step": step, "val_loss": checkpoints[step], "elapsed_s": 2.0 * step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for step, val_loss in checkpoints.items():
        save_checkpoint(
            run,
            {"w": torch.zeros(64)},
            cfg,
            "{}",
            {},
            {"step": step, "tokens_seen": step * TOKENS_PER_STEP, "val_loss": val_loss},
        )
    if status is not None:
        write_status(run, status, step=steps_done, **status_fields)
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Five runs: finished, interrupted (2 processes), failed without a checkpoint, and two
    older runs without status.json (one reached its last step)."""
    root = tmp_path / "runs"
    make_run(
        root,
        "tiny",
        "20260101-000000",
        steps_done=10,
        checkpoints={4: 2.0, 8: 1.4, 10: 1.6},
        status="finished",
        world_size=1,
    )
    make_run(
        root,
        "tiny",
        "20260102-000000",
        steps_done=6,
        checkpoints={6: 1.9},
        status="interrupted",
        world_size=2,
        overrides=("train.lr=0.0003", "model.n_layer=3"),
    )
    make_run(root, "broken", "20260103-000000", steps_done=2, status="failed", error="OSError: x")
    make_run(root, "legacy", "20250101-000000", steps_done=10, checkpoints={10: 1.7})
    make_run(root, "legacy", "20250102-000000", steps_done=4, checkpoints={4: 2.2})
    return root


def by_id(summaries) -> dict:
    return {s["run_id"] if isinstance(s, dict) else s.run_id: s for s in summaries}


class Terminal(io.StringIO):
    """stdin as a person at a terminal who types the given answer."""

    def isatty(self) -> bool:
        return True


# -- list ---------------------------------------------------------------------------------


def test_list_json_has_statuses_steps_losses_and_sizes(runs: Path, capsys):
    assert runs_main(["list", "--runs-dir", str(runs), "--json"]) == 0
    listed = by_id(json.loads(capsys.readouterr().out))
    assert list(listed) == [  # sorted by name, then run id
        "20260103-000000",
        "20250101-000000",
        "20250102-000000",
        "20260101-000000",
        "20260102-000000",
    ]
    done = listed["20260101-000000"]
    assert (done["name"], done["status"]) == ("tiny", "finished")
    assert (done["steps_done"], done["steps_planned"]) == (10, 10)
    assert done["tokens_seen"] == 10 * TOKENS_PER_STEP
    assert (done["best_val_loss"], done["last_val_loss"]) == (1.4, 1.6)
    assert done["last_loss"] == pytest.approx(3.0)
    assert done["wall_s"] == pytest.approx(20.0)
    assert done["last_checkpoint"] == "step_00000010"
    assert [(c["name"], c["step"], c["val_loss"]) for c in done["checkpoints"]] == [
        ("step_00000004", 4, 2.0),
        ("step_00000008", 8, 1.4),
        ("step_00000010", 10, 1.6),
    ]
    folder = runs / "tiny" / "20260101-000000"
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert done["disk_bytes"] == on_disk > 0
    assert done["checkpoints"][0]["disk_bytes"] == disk_bytes(folder / "checkpoints/step_00000004")

    assert listed["20260102-000000"]["status"] == "interrupted"
    assert listed["20260102-000000"]["steps_done"] == 6
    failed = listed["20260103-000000"]
    assert failed["status"] == "failed" and "OSError" in failed["status_note"]
    assert failed["last_checkpoint"] is None and failed["best_val_loss"] is None
    # Older runs without status.json: finished only if they reached train.max_steps.
    assert listed["20250101-000000"]["status"] == "finished"
    assert listed["20250102-000000"]["status"] == "interrupted"


def test_list_table_is_readable_in_100_columns(runs: Path, capsys):
    assert runs_main(["list", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "run", "id"]
    assert max(len(line) for line in lines) <= 100, out
    row = next(line for line in lines if "20260101-000000" in line)
    assert row.split()[:4] == ["tiny", "20260101-000000", "finished", "10/10"]
    assert "1.4000" in row and "1.6000" in row and "KiB" in row
    assert "5 run(s)" in out


def test_list_of_one_name_and_of_nothing(runs: Path, tmp_path: Path, capsys):
    assert runs_main(["list", "legacy", "--runs-dir", str(runs), "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == {"legacy"}
    empty = tmp_path / "nothing-here"
    assert runs_main(["list", "--runs-dir", str(empty)]) == 0
    assert "no runs under" in capsys.readouterr().out
    assert runs_main(["list", "--runs-dir", str(empty), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


# -- show ---------------------------------------------------------------------------------


def test_show_gives_config_checkpoints_and_the_resume_command(runs: Path, capsys):
    assert runs_main(["show", "tiny/20260102-000000", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    run = runs / "tiny" / "20260102-000000"
    assert f"lmlab train --nproc 2 --resume {run}" in out  # it trained in 2 processes
    assert "interrupted" in out and "3 layers x 48 wide" in out and "lr 0.0003" in out
    assert "step_00000006" in out and "1.9000" in out and "6/10" in out
    assert f"{TOKENS_PER_STEP:,} tokens/step" in out

    assert runs_main(["show", "20260101-000000", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "--resume" not in out  # nothing to resume
    for name in ("step_00000004", "step_00000008", "step_00000010"):
        assert name in out
    assert "best" in next(line for line in out.splitlines() if "step_00000008" in line)


def test_show_json_and_a_run_that_cannot_resume(runs: Path, capsys):
    assert runs_main(["show", "legacy", "--runs-dir", str(runs), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)  # NAME: its newest run
    assert shown["run_id"] == "20250102-000000" and shown["status"] == "interrupted"
    assert shown["resume_command"] == f"lmlab train --resume {runs / 'legacy/20250102-000000'}"
    assert shown["params"] > 0 and shown["config"]["train"]["max_steps"] == 10
    assert runs_main(["show", "broken", "--runs-dir", str(runs)]) == 0
    assert "not possible: it saved no checkpoint" in capsys.readouterr().out
    with pytest.raises(UserError, match="no run 'missing'"):
        runs_main(["show", "missing", "--runs-dir", str(runs)])


def test_resume_command(runs: Path):
    run = runs / "tiny" / "20260101-000000"
    assert resume_command(run) == f"lmlab train --resume {run}"
    assert resume_command("runs/my run/1") == "lmlab train --resume 'runs/my run/1'"


# -- compare ------------------------------------------------------------------------------


def test_compare_shows_only_the_differences(runs: Path, capsys):
    a, b = "tiny/20260101-000000", "tiny/20260102-000000"
    assert runs_main(["compare", a, b, "--runs-dir", str(runs), "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared["config_differences"] == {"model.n_layer": [2, 3], "train.lr": [0.001, 0.0003]}
    assert [s["status"] for s in compared["summaries"]] == ["finished", "interrupted"]
    assert runs_main(["compare", a, b, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and "model.n_layer" in out and "train.max_steps" not in out
    assert "best val loss" in out and "1.4000" in out and "1.9000" in out
    with pytest.raises(UserError, match="at least two"):
        runs_main(["compare", a, a, "--runs-dir", str(runs)])


def test_config_differences_flattens_to_dotted_keys():
    cfgs = [build_config("ultra-tiny", overrides=o) for o in ([], ["eval.interval=5"], [])]
    assert config_differences(cfgs) == {"eval.interval": [200, 5, 200]}
    assert config_differences(cfgs[:1] * 2) == {}


# -- delete -------------------------------------------------------------------------------


def test_delete_refuses_without_yes_when_not_a_terminal(runs: Path, capsys):
    run = runs / "tiny" / "20260101-000000"
    with pytest.raises(UserError, match="pass --yes"):
        runs_main(["delete", str(run)])
    assert run.is_dir()
    assert str(run) in capsys.readouterr().out  # it said what it would delete


def test_delete_with_yes_and_at_a_terminal(runs: Path, capsys, monkeypatch):
    first, second = runs / "tiny" / "20260101-000000", runs / "tiny" / "20260102-000000"
    size = disk_bytes(first)
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert runs_main(["delete", "tiny/20260101-000000", "--runs-dir", str(runs)]) == 1
    assert first.is_dir() and "nothing deleted" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert runs_main(["delete", "tiny/20260101-000000", "--runs-dir", str(runs)]) == 0
    assert not first.exists() and second.is_dir()
    assert f"freed {size / 1024:.1f} KiB" in capsys.readouterr().out
    assert runs_main(["delete", str(second), "--yes"]) == 0
    assert not (runs / "tiny").exists()  # the name folder went with its last run
    assert [s.run_id for s in list_runs(runs)] == [
        "20260103-000000",
        "20250101-000000",
        "20250102-000000",
    ]


def test_delete_keep_best_keeps_exactly_the_best_checkpoint(runs: Path, capsys):
    run = runs / "tiny" / "20260101-000000"
    assert runs_main(["delete", str(run), "--keep-best", "--yes"]) == 0
    assert [c.name for c in list_checkpoints(run)] == ["step_00000008"]  # val loss 1.4
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert "keeping" in capsys.readouterr().out
    assert runs_main(["delete", str(run), "--keep-best", "--yes"]) == 0
    assert "nothing to delete" in capsys.readouterr().out
    # No val loss anywhere: the newest checkpoint stays.
    other = make_run(runs, "noval", "1", steps_done=5, checkpoints={3: None, 5: None})
    assert delete_run(other, keep_best=True) > 0
    assert [c.name for c in list_checkpoints(other)] == ["step_00000005"]


def test_delete_refuses_what_is_not_a_run(tmp_path: Path):
    (tmp_path / "precious").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        delete_run(tmp_path / "precious")
    assert (tmp_path / "precious").is_dir()


def test_a_deletion_cut_short_leaves_no_run_and_clean_finishes_it(runs: Path, monkeypatch):
    run = runs / "tiny" / "20260101-000000"

    def fail(path, *args, **kwargs):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patched:
        patched.setattr("shutil.rmtree", fail)
        with pytest.raises(UserError, match="could not delete"):
            delete_run(run)
    assert not run.exists() and run not in find_runs(runs)
    (left,) = [item for item in clean_candidates(runs) if item.path.parent == run.parent]
    assert left.kind == "leftover" and left.path.name.endswith(".old")
    assert runs_main(["clean", "--runs-dir", str(runs), "--yes"]) == 0
    assert not left.path.exists()


def test_one_line_error_through_the_cli(runs: Path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["runs", "delete", "tiny", "--runs-dir", str(runs)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab runs: error:") and "--yes" in err and err.count("\n") == 1


# -- clean --------------------------------------------------------------------------------


def test_clean_removes_leftovers_and_runs_without_checkpoints(runs: Path, capsys):
    good = runs / "tiny" / "20260101-000000"
    tmp_ckpt = good / "checkpoints" / ".step_00000012.abcd.tmp"
    tmp_ckpt.mkdir()
    (tmp_ckpt / "model.safetensors").write_bytes(b"x" * 1000)
    old_ckpt = good / "checkpoints" / ".step_00000010.efgh.old"
    old_ckpt.mkdir()
    torn_status = good / ".status.json.ijkl.tmp"
    torn_status.write_text("{")
    running = make_run(runs, "live", "20260104-000000", steps_done=1, status="running")
    (running / "checkpoints").mkdir()
    writing = running / "checkpoints" / ".step_00000002.mnop.tmp"
    writing.mkdir()
    good_before = sorted(
        p.name for p in good.rglob("*") if ".tmp" not in str(p) and ".old" not in str(p)
    )

    with RunLock(running):  # a live trainer holds it
        assert runs_main(["clean", "--runs-dir", str(runs), "--yes"]) == 0
        assert running.is_dir() and writing.is_dir()
    out = capsys.readouterr().out
    assert "skipping 1 running run" in out and "freed" in out
    assert not tmp_ckpt.exists() and not old_ckpt.exists() and not torn_status.exists()
    assert not (runs / "broken").exists()  # failed before its first checkpoint
    assert sorted(p.name for p in good.rglob("*")) == good_before
    assert {s.run_id for s in list_runs(runs)} == {
        "20260101-000000",
        "20260102-000000",
        "20250101-000000",
        "20250102-000000",
        "20260104-000000",
    }
    assert runs_main(["clean", "--runs-dir", str(runs), "--yes"]) == 0
    assert not running.exists()  # no longer running, and it never saved a checkpoint
    assert runs_main(["clean", "--runs-dir", str(runs)]) == 0
    assert "nothing to clean" in capsys.readouterr().out.splitlines()[-1]


def test_clean_refuses_without_yes_when_not_a_terminal(runs: Path):
    with pytest.raises(UserError, match="pass --yes"):
        runs_main(["clean", "--runs-dir", str(runs)])
    assert (runs / "broken").is_dir()


# -- a live process -----------------------------------------------------------------------

HOLD_LOCK = (
    "import sys, time\n"
    "from lmlab.runs.lock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "time.sleep(120)\n"
)


@pytest.mark.posix
def test_a_live_trainer_is_running_and_a_killed_one_failed(runs: Path, capsys):
    run = runs / "tiny" / "20260102-000000"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)])
    try:
        deadline = time.monotonic() + 30
        while read_holder(run).get("pid") != proc.pid:
            assert time.monotonic() < deadline and proc.poll() is None, "the lock was not taken"
            time.sleep(0.02)
        write_status(run, "running", pid=proc.pid)
        summary = summarize_run(run)
        assert summary.status == "running" and f"process {proc.pid}" in summary.status_note
        with pytest.raises(UserError, match="is running"):
            runs_main(["delete", str(run), "--yes"])
        with pytest.raises(UserError, match="is running"):
            runs_main(["delete", str(run), "--keep-best", "--yes"])
        with pytest.raises(UserError, match="is running"):
            delete_run(run)  # the library refuses too, holding the lock itself
        assert run.is_dir() and run not in [item.path for item in clean_candidates(runs)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    summary = summarize_run(run)
    assert summary.status == "failed" and "killed or crashed" in summary.status_note
    assert runs_main(["show", str(run)]) == 0
    assert "lmlab train --nproc 2 --resume" in capsys.readouterr().out
    assert runs_main(["delete", str(run), "--yes"]) == 0
    assert not run.exists()


# -- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trained_run_is_listed_as_finished(flowroll_data: Path, tmp_path: Path, capsys):
    from lmlab.train.loop import train

    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path / 'runs'}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.max_steps=8",
            "train.warmup_steps=2",
            "train.device=cpu",
            "eval.interval=4",
            "eval.batches=1",
            "checkpoint.interval=4",
            "logging.interval=1",
            "logging.tensorboard=false",
        ],
    )
    result = train(cfg, log=lambda *a, **k: None)
    assert runs_main(["list", "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["path"] == str(result.run_dir)
    assert listed["status"] == "finished", listed
    assert (listed["steps_done"], listed["steps_planned"]) == (8, 8)
    assert listed["last_checkpoint"] == "step_00000008"
    assert listed["tokens_seen"] == 8 * 4 * 32
    assert listed["best_val_loss"] is not None and os.path.isdir(listed["path"])
