"""A full disk during a checkpoint save or a prepare (issue 14): one line, exit 2, nothing
half-written, and the last good checkpoint intact."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lmlab.cli import main as cli_main
from lmlab.runs.checkpoint import list_checkpoints, verify_checkpoint


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]) if args else None)


def test_disk_full_during_a_checkpoint_save(
    flowroll_data: Path, tmp_path: Path, monkeypatch, capsys
):
    from lmlab.runs import checkpoint

    real_save, calls = checkpoint.save_file, {"n": 0}

    def second_save_fails(weights, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"half a file")
            disk_full(path)
        return real_save(weights, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", second_save_fails)
    argv = [
        "train",
        "--preset",
        "ultra-tiny",
        "--data",
        str(flowroll_data),
        f"logging.runs_dir={tmp_path}",
        "train.max_steps=4",
        "checkpoint.interval=2",
        "train.device=cpu",
        "eval.interval=0",
        "logging.tensorboard=false",
    ]
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no space left on the device" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    (run,) = tmp_path.glob("*/*")
    (ckpt,) = list_checkpoints(run)
    assert ckpt.name == "step_00000002"
    verify_checkpoint(ckpt)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]


def test_disk_full_during_prepare(tmp_path: Path, monkeypatch, capsys):
    from lmlab.data import shards

    (tmp_path / "t.txt").write_text("\n\n".join(f"paragraph {i}" for i in range(2000)))
    monkeypatch.setattr(shards.ShardWriter, "write", lambda self, tokens: disk_full(self.directory))
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "prepare",
                "--input",
                str(tmp_path / "t.txt"),
                "--tokenizer",
                "char",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no space left on the device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
