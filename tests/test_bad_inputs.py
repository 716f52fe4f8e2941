"""Bad values that used to give a traceback or be accepted silently: each is now one line
on stderr, exit code 2, and nothing written (issue 14's table, a growing list)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.cli import main as cli_main


@pytest.fixture(scope="module")
def checkpoint(flowroll_data: Path, tmp_path_factory) -> Path:
    from lmlab.config import build_config
    from lmlab.train.loop import train

    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path_factory.mktemp('runs')}",
            "train.max_steps=2",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=lambda *a, **k: None).run_dir


CASES = [
    # (argv with {data} / {run} / {tmp} placeholders, expected message)
    ("train --data {data} train.lr=.nan", "train.lr must be a finite number"),
    ("train --data {data} train.lr=.inf", "train.lr must be a finite number"),
    ("train --data {data} train.adam_eps=-1", "train.adam_eps must be positive"),
    ("train --data {data} train.adam_eps=0", "train.adam_eps must be positive"),
    ("train --data {data} model.dropout=.nan", "model.dropout must be a finite number"),
    ("train --data {data} logging.name=../../../escape", "is not a run name"),
    ("train --data {data} logging.name=a/b", "is not a run name"),
    ("train --data {data} logging.name=" + "x" * 300, "is not a run name"),
    ("train --data {data} logging.runs_dir={tmp}/file.txt", "is not a folder"),
    ("generate {run} --prompt a --temperature nan", "temperature must be >= 0 and finite"),
    ("generate {run} --prompt a --temperature inf", "temperature must be >= 0 and finite"),
    ("plan --preset tiny --tokens nan", "must be a positive finite number"),
    ("plan --preset tiny --tokens inf", "must be a positive finite number"),
    ("data inspect {data} --tokens -5", "--tokens must be >= 0"),
]


@pytest.mark.parametrize(
    "argv, message", CASES, ids=[c[0].split(" {")[0] + f" #{i}" for i, c in enumerate(CASES)]
)
def test_one_line_error_and_nothing_written(
    argv, message, flowroll_data, checkpoint, tmp_path, capsys
):
    (tmp_path / "file.txt").write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    args = [a.format(data=flowroll_data, run=checkpoint, tmp=tmp_path) for a in argv.split()]
    if args[0] == "train":  # a small preset, so a case that slipped through would be quick
        args[1:1] = ["--preset", "ultra-tiny"]
        if not any(a.startswith("logging.runs_dir=") for a in args):
            args.append(f"logging.runs_dir={tmp_path / 'runs'}")  # would show up below
    with pytest.raises(SystemExit) as info:
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert sorted(tmp_path.rglob("*")) == before
    assert not (Path.cwd() / "escape").exists()
