"""Checkpoint integrity and resume hygiene (issue 14, items 2 and 5): hashes recorded at
save and checked at every load, fallback to the newest checkpoint that verifies, resuming
from a named checkpoint, leftovers of interrupted saves removed, a no-op resume that
writes nothing, data paths stored absolute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.cli import main as cli_main
from lmlab.config import build_config, load_config
from lmlab.errors import UserError
from lmlab.runs.checkpoint import (
    CorruptCheckpointError,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
    verify_checkpoint,
)
from lmlab.train.loop import train

QUIET = {"log": lambda *a, **k: None}


def config(data: Path | str, runs: Path, *extra: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.max_steps=12",
            "train.warmup_steps=2",
            "train.device=cpu",
            "eval.interval=4",
            "eval.batches=2",
            "checkpoint.interval=4",
            "checkpoint.keep_last=5",
            "logging.interval=2",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip_bit(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def straight(flowroll_data: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run."""
    return weights(
        train(config(flowroll_data, tmp_path_factory.mktemp("straight")), **QUIET).run_dir
    )


def stopped_at_8(data: Path, runs: Path) -> Path:
    result = train(config(data, runs), stop_at_step=8, **QUIET)
    assert [c.name for c in list_checkpoints(result.run_dir)] == ["step_00000004", "step_00000008"]
    return result.run_dir


def test_every_file_is_hashed_and_verified(flowroll_data: Path, tmp_path: Path):
    run = stopped_at_8(flowroll_data, tmp_path)
    ckpt = list_checkpoints(run)[-1]
    meta = read_meta(ckpt)
    assert meta["hash"] == "sha256"
    assert sorted(meta["files"]) == sorted(p.name for p in ckpt.iterdir() if p.name != "meta.json")
    verify_checkpoint(ckpt)
    flip_bit(ckpt / "model.safetensors")  # a bit in the last tensor's data
    with pytest.raises(CorruptCheckpointError, match="model.safetensors does not match the hash"):
        verify_checkpoint(ckpt)
    with pytest.raises(CorruptCheckpointError, match="previous checkpoint is .*step_00000004"):
        resolve_checkpoint(run)


@pytest.mark.parametrize(
    "command", ["generate {run} --prompt a", "eval {run}", "export {run} --out {out}"]
)
def test_commands_refuse_a_corrupt_checkpoint_in_one_line(
    command, flowroll_data: Path, tmp_path: Path, capsys
):
    run = stopped_at_8(flowroll_data, tmp_path / "runs")
    flip_bit(list_checkpoints(run)[-1] / "model.safetensors")
    argv = command.format(run=run, out=tmp_path / "out").split()
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "does not match the hash" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["flip-weights", "truncate-state", "garbage-meta", "no-weights"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(
    damage, flowroll_data: Path, tmp_path: Path, straight
):
    run = stopped_at_8(flowroll_data, tmp_path)
    newest = list_checkpoints(run)[-1]
    if damage == "flip-weights":
        flip_bit(newest / "model.safetensors")
    elif damage == "truncate-state":
        state = newest / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "garbage-meta":
        (newest / "meta.json").write_text("{not json")
    else:
        (newest / "model.safetensors").unlink()
    lines: list[str] = []
    resumed = train(
        config(flowroll_data, tmp_path), resume=run, log=lambda *a, **k: lines.append(str(a[0]))
    )
    assert any("step_00000008 fails its integrity check" in x for x in lines), lines
    assert any("resuming" in x and "from step_00000004 (step 4)" in x for x in lines), lines
    assert resumed.state.step == 12
    assert same(weights(run), straight)  # the same as never stopping
    assert (run / "checkpoints" / "set_aside" / "step_00000008" / "SET_ASIDE.txt").is_file()
    assert [c.name for c in list_checkpoints(run)] == [
        "step_00000004",
        "step_00000008",
        "step_00000012",
    ]
    verify_checkpoint(list_checkpoints(run)[1])  # step 8 written again, sound


def test_resume_from_a_named_checkpoint(flowroll_data: Path, tmp_path: Path, straight):
    run = stopped_at_8(flowroll_data, tmp_path)
    resumed = train(
        config(flowroll_data, tmp_path), resume=run / "checkpoints" / "step_00000004", **QUIET
    )
    assert resumed.run_dir == run and resumed.state.step == 12
    assert same(weights(run), straight)
    assert (run / "checkpoints" / "set_aside" / "step_00000008").is_dir()
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 12


def test_a_named_checkpoint_that_does_not_verify_is_refused(flowroll_data: Path, tmp_path: Path):
    run = stopped_at_8(flowroll_data, tmp_path)
    flip_bit(run / "checkpoints" / "step_00000004" / "model.safetensors")
    with pytest.raises(UserError, match="does not match the hash"):
        train(
            config(flowroll_data, tmp_path), resume=run / "checkpoints" / "step_00000004", **QUIET
        )
    assert (run / "checkpoints" / "step_00000008").is_dir()  # nothing was set aside


def test_leftovers_of_interrupted_saves_are_removed(flowroll_data: Path, tmp_path: Path):
    run = stopped_at_8(flowroll_data, tmp_path)
    for name in (".step_00000012.x1.tmp", ".step_00000004.x2.old"):
        (run / "checkpoints" / name / "sub").mkdir(parents=True)
        (run / "checkpoints" / name / "sub" / "model.safetensors").write_bytes(b"0" * 1000)
    train(config(flowroll_data, tmp_path), resume=run, **QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000004",
        "step_00000008",
        "step_00000012",
    ]


def test_garbage_meta_in_a_kept_checkpoint_does_not_break_pruning(
    flowroll_data: Path, tmp_path: Path
):
    run = stopped_at_8(flowroll_data, tmp_path)
    (run / "checkpoints" / "step_00000004" / "meta.json").write_text("[1, 2")
    train(config(flowroll_data, tmp_path, "checkpoint.keep_last=1"), resume=run, **QUIET)
    assert [c.name for c in list_checkpoints(run)] == ["step_00000012"]


def test_resuming_a_finished_run_writes_nothing(flowroll_data: Path, tmp_path: Path):
    run = train(config(flowroll_data, tmp_path), **QUIET).run_dir

    def snapshot() -> dict[str, tuple[int, bytes]]:
        return {
            str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run.rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    lines: list[str] = []
    result = train(
        config(flowroll_data, tmp_path), resume=run, log=lambda *a, **k: lines.append(a[0])
    )
    assert result.state.step == 12 and not result.interrupted
    assert any("nothing to do" in x for x in lines)
    assert snapshot() == before


def test_data_path_is_stored_absolute(flowroll_data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(flowroll_data.parent)
    cfg = config(flowroll_data.name, tmp_path / "runs", "train.max_steps=2")
    run = train(cfg, **QUIET).run_dir
    assert load_config(run / "config.yaml").data.path == str(flowroll_data)
    monkeypatch.chdir(tmp_path)  # another directory: the run still resumes and evaluates
    train(load_config(run / "config.yaml"), resume=run, **QUIET)
    assert os.path.isabs(load_config(run / "config.yaml").data.path)
