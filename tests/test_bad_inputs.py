"""Bad values that used to give a traceback or be accepted silently: each is now one line
on stderr, exit code 2, and nothing written (issue 14's table, a growing list)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lmlab.cli import main as cli_main

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only folders


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


@pytest.fixture(scope="module")
def inputs(flowroll_data: Path, tmp_path_factory) -> Path:
    """Bad input files, outside each case's tmp_path (which must stay as it was)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.txt").write_text("")
    (root / "empty.jsonl").write_text("")
    (root / "list.json").write_text("[1, 2]\n")
    (root / "bad.jsonl").write_text('{"prompt": "a", "prediction": "b"}\n{not json\n')
    (root / "good.jsonl").write_text('{"prompt": "a", "prediction": "b", "reference": "b"}\n')
    (root / "mc.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": 0}\n')
    manifest = json.loads((flowroll_data / "manifest.json").read_text())
    for name, damaged in (("list-manifest", [manifest]), ("no-splits", {**manifest})):
        shutil.copytree(flowroll_data, root / name)
        if isinstance(damaged, dict):
            del damaged["splits"]
        (root / name / "manifest.json").write_text(json.dumps(damaged))
    return root


CASES = [
    # (argv with {data} / {run} / {tmp} placeholders, expected message)
    ("train --data {data} train.lr=.nan", "train.lr must be a finite number"),
    ("train --data {data} train.lr=.inf", "train.lr must be a finite number"),
    ("train --data {data} train.adam_eps=-1", "train.adam_eps must be positive"),
    ("train --data {data} train.adam_eps=0", "train.adam_eps must be positive"),
    ("train --data {data} train.seed=-1", "train.seed must be >= 0"),
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
    # data directories: missing, a file, a damaged manifest
    ("train --data {tmp}/nope", "does not exist: create it with `lmlab prepare`"),
    ("train --data {tmp}/file.txt", "has no manifest.json"),
    ("train --data {in}/list-manifest", "is not a manifest"),
    ("train --data {in}/no-splits", "has no valid 'splits'"),
    ("data inspect {in}/list-manifest", "is not a manifest"),
    ("data inspect {in}/no-splits", "has no valid 'splits'"),
    ("data verify {in}/no-splits", "has no valid 'splits'"),
    ("data inspect {tmp}/nope", "does not exist"),
    ("data verify {tmp}", "has no manifest.json"),
    # train: options and config overrides
    ("train --data {data} --stop-at-step -1", "--stop-at-step must be a step >= 1"),
    ("train --data {data} --stop-at-step 0", "--stop-at-step must be a step >= 1"),
    ("train --data {data} --nproc 0", "--nproc must be at least 1"),
    ("train --data {data} --device tpu", "train.device must be auto, cpu, cuda"),
    ("train --data {data} train.lr", "bad override 'train.lr': expected SECTION.KEY=VALUE"),
    ("train --data {data} =3", "bad override '=3'"),
    ("train --data {data} train.nokey=3", "unknown train config key 'nokey'"),
    ("train --data {data} nosection.lr=3", "unknown config section 'nosection'"),
    ("train --data {data} train.max_steps=abc", "train.max_steps must be an integer"),
    ("train --data {data} train.max_steps=-5", "train.max_steps must be positive"),
    ("train --data {data} train.lr=-1", "train.lr must be positive"),
    ("train --data {data} train.weight_decay=-1", "train.weight_decay must not be negative"),
    ("train --data {data} train.grad_clip=nan", "train.grad_clip must be a finite number"),
    ("train --data {data} train.strategy=zero9", "train.strategy must be one of"),
    ("train --data {data} train.precision=int4", "train.precision must be one of"),
    ("train --data {data} model.family=gpt3", "model.family must be one of"),
    ("train --data {data} model.n_layer=0", "n_layer must be a positive integer"),
    ("train --data {data} model.dropout=1.5", "dropout must be in [0, 1)"),
    ("train --data {data} eval.interval=-1", "eval.interval must not be negative"),
    ("train --config {tmp}/nope.yaml --data {data}", "config file"),
    ("train --config {in}/list.json --data {data}", "must hold a mapping of config sections"),
    ("train --data {data} logging.runs_dir={ro}/runs", "permission denied"),
    # prepare
    ("prepare --input {tmp}/nope.txt --tokenizer char --out {tmp}/o", "no such file or folder"),
    ("prepare --input {in}/empty.txt --tokenizer char --out {tmp}/o", "empty corpus"),
    ("prepare --input {in}/list.json --tokenizer char --out {tmp}/o", "no document fell"),
    ("prepare --input {tmp}/file.txt --tokenizer char --out {tmp}", "already exists"),
    ("prepare --input {tmp}/file.txt --tokenizer bpe:abc --out {tmp}/o", "bad vocabulary size"),
    ("prepare --input {tmp}/file.txt --tokenizer bpe:-5 --out {tmp}/o", "too small for bpe"),
    ("prepare --input {tmp}/file.txt --out {tmp}/o --val-fraction nan", "--val-fraction must"),
    ("prepare --input {tmp}/file.txt --out {tmp}/o --val-fraction -0.1", "--val-fraction must"),
    ("prepare --input {tmp}/file.txt --out {tmp}/o --shard-tokens -5", "--shard-tokens must"),
    ("prepare --input dsl:flowroll:-3 --tokenizer char --out {tmp}/o", "must be positive"),
    ("prepare --input dsl:nope --tokenizer char --out {tmp}/o", "unknown practice language"),
    ("prepare --input {tmp}/file.txt --tokenizer {tmp}/nope.json --out {tmp}/o", "does not exist"),
    ("prepare --input dsl:flowroll:300 --tokenizer char --out {ro}/o", "permission denied"),
    # dsl
    ("dsl generate --lang flowroll --n 5 --difficulty 1 --out {tmp}", "is a folder"),
    ("dsl generate --lang flowroll --n -5 --difficulty 1 --out {tmp}/x.txt", "--n must be"),
    ("dsl generate --lang flowroll --n 5 --difficulty 3-1 --out {tmp}/x.txt", "difficulty must"),
    ("dsl generate --lang nope --n 5 --difficulty 1 --out {tmp}/x.txt", "unknown practice"),
    ("dsl generate --lang flowroll --n 5 --difficulty 1 --out {ro}/x.txt", "permission denied"),
    ("dsl eval --lang flowroll --predictions {tmp}/nope.txt", "predictions file not found"),
    ("dsl eval --lang flowroll --predictions {in}/empty.txt", "no prediction lines"),
    # tokenizer, quickstart, config, runs
    ("tokenizer train --input {tmp}/file.txt --kind char --out {tmp}/file.txt", "is a file"),
    ("tokenizer train --input {tmp}/nope.txt --kind char --out {tmp}/t", "no such file"),
    ("tokenizer train --input {tmp}/file.txt --kind bpe --out {tmp}/t", "bpe needs --vocab-size"),
    ("quickstart --out {tmp}/file.txt", "is a file: name a folder"),
    ("quickstart --programs -1 --out {tmp}/q", "--programs must be positive"),
    ("config show --preset tiny train.max_steps=abc", "train.max_steps must be an integer"),
    ("runs list --runs-dir {tmp}/file.txt", "is a file, not a folder of runs"),
    ("runs clean --runs-dir {tmp}/file.txt --yes", "is a file, not a folder of runs"),
    ("runs show {tmp}/file.txt", "is not a run folder"),
    # generate, chat
    ("generate {run} --prompt ZZZ~", "characters outside the model's vocabulary: 'Z' '~'"),
    ("generate {run} --prompt a --max-new-tokens -1", "max_new_tokens must be >= 0"),
    ("generate {run} --prompt a --top-k -1", "top_k must be >= 1"),
    ("generate {run} --prompt a --top-p nan", "top_p must be in (0, 1]"),
    ("generate {run} --prompt a --top-p 1.5", "top_p must be in (0, 1]"),
    ("generate {run} --prompt a --device tpu", "unknown device 'tpu'"),
    ("generate {run} --prompt a --max-new-tokens 100000", "does not fit the model's context"),
    ("generate {tmp}/nope --prompt a", "does not exist: pass a run folder"),
    ("generate {tmp}/file.txt --prompt a", "has no checkpoints"),
    ("generate {data} --prompt a", "has no checkpoints"),
    ("chat {run} --max-new-tokens -1", "--max-new-tokens must be >= 1"),
    # predict, score, compare, eval
    ("predict {run} --input {tmp}/nope.jsonl --out {tmp}/p.jsonl", "does not exist"),
    ("predict {run} --input {in}/empty.jsonl --out {tmp}/p.jsonl", "holds no records"),
    ("predict {run} --input {in}/bad.jsonl --out {tmp}/p.jsonl", "bad.jsonl:2: not JSON"),
    ("predict {run} --input {in}/list.json --out {tmp}/p.jsonl", "expected a JSON object"),
    ("predict {run} --input dsl:flowroll:5 --out {tmp}", "is a folder: name a .jsonl file"),
    ("predict {run} --input dsl:flowroll:5 --out {tmp}/p.jsonl --batch-size 0", "--batch-size"),
    ("predict {run} --input dsl:flowroll:5 --out {tmp}/p.jsonl --top-p -1", "top_p must be"),
    ("predict {run} --input dsl:flowroll:5 --out {tmp}/p.jsonl --limit -1", "--limit must be"),
    ("predict {run} --input dsl:flowroll:5 --out {ro}/p.jsonl", "permission denied"),
    ("score --predictions {tmp}/nope.jsonl", "predictions file not found"),
    ("score --predictions {in}/empty.jsonl", "holds no records"),
    ("score --predictions {in}/bad.jsonl", "bad.jsonl:2: not JSON"),
    ("score --predictions {tmp}", "is a folder"),
    ("score --predictions {in}/good.jsonl --metrics nope", "unknown metric 'nope'"),
    ("score --predictions {in}/good.jsonl --bootstrap -1", "--bootstrap must be"),
    ("score --predictions {in}/good.jsonl --seed -1", "bootstrap seed must be"),
    ("score --predictions {in}/good.jsonl --out {tmp}", "is a folder: name a file"),
    ("compare {run} {run} --task dsl:flowroll:2 --bootstrap-seed -1", "bootstrap seed must"),
    ("compare {run} {run} --task {in}/empty.jsonl", "holds no records"),
    ("eval {run} --task {in}/mc.jsonl --bootstrap-seed -1", "bootstrap seed must be"),
    ("eval {run} --task {in}/mc.jsonl --limit -1", "--limit must be >= 1"),
    ("eval {run} --task {in}/bad.jsonl", "missing context, choices, label"),
    ("eval {run} --batch-size -2", "--batch-size positive"),
    ("eval {run} --data {tmp}/file.txt", "has no manifest.json"),
    # export, publish, plan, bench
    ("export {run} --out {tmp}/e --dtype int3", "--dtype for --format hf must be one of"),
    ("export {run} --out {tmp}/e --format onnx", "invalid choice: 'onnx'"),
    ("export {run} --out {tmp}/file.txt", "is a file: --out must name a folder"),
    ("publish {run} --repo bad --dry-run --out {tmp}/pub", "is not a Hub repo id"),
    ("publish {run} --repo a/b --dry-run --out {tmp}/p --eval {tmp}/no.json", "does not exist"),
    ("plan --preset tiny --hardware 1000000000000xh100", "hardware count must be between 1"),
    ("plan --preset tiny --hardware 0xh100", "hardware count must be between 1"),
    ("plan --preset tiny --params -5", "must be a positive finite number"),
    ("plan --preset tiny --mfu nan", "--mfu is a fraction of peak"),
    ("plan --preset tiny --micro-batch -1", "must be at least 1"),
    ("plan --preset tiny --hardware-file {tmp}/nope.yaml", "cannot read hardware file"),
    ("plan --preset tiny --hardware-file {in}/list.json", "expected a mapping"),
    ("plan api --tokens-in nan --tokens-out 5 --preset tiny", "must be a positive finite"),
    ("bench --preset ultra-tiny --steps -1", "--steps must be positive"),
    ("bench --preset ultra-tiny --device tpu", "unknown device 'tpu'"),
]


@pytest.mark.parametrize(
    "argv, message", CASES, ids=[c[0].split(" {")[0] + f" #{i}" for i, c in enumerate(CASES)]
)
def test_one_line_error_and_nothing_written(
    argv, message, flowroll_data, checkpoint, inputs, tmp_path, capsys
):
    (tmp_path / "file.txt").write_text("not a folder")
    if "{ro}" in argv:  # a read-only output folder
        if ROOT:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
    before = sorted(tmp_path.rglob("*"))
    args = [
        a.format(
            data=flowroll_data, run=checkpoint, tmp=tmp_path, ro=tmp_path / "ro", **{"in": inputs}
        )
        for a in argv.split()
    ]
    if args[0] == "train":  # a small preset, so a case that slipped through would be quick
        args[1:1] = ["--preset", "ultra-tiny"]
        if not any(a.startswith("logging.runs_dir=") for a in args):
            args.append(f"logging.runs_dir={tmp_path / 'runs'}")  # would show up below
    with pytest.raises(SystemExit) as info:
        cli_main(args)
    out, err = capsys.readouterr()
    assert info.value.code == 2, err
    assert not out.strip(), out  # not even the prompt that `generate` echoes
    assert message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert sorted(tmp_path.rglob("*")) == before
    assert not (Path.cwd() / "escape").exists()


def test_permission_denied_is_one_line(tmp_path, monkeypatch, capsys):
    """The read-only cases above are skipped as root: the same path, with the error faked."""

    def denied(path, text):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.txt.ab.tmp"))

    monkeypatch.setattr("lmlab.commands.dsl.atomic_write_text", denied)
    argv = ["dsl", "generate", "--lang", "flowroll", "--n", "3", "--difficulty", "1"]
    with pytest.raises(SystemExit) as info:
        cli_main([*argv, "--out", str(tmp_path / "x.txt")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert err.strip() == (
        f"lmlab dsl: error: no access to {tmp_path} (permission denied): "
        "choose a folder you may write to, or change its permissions"
    )


class _Started(Exception):
    pass


@pytest.mark.parametrize("command", ["train", "bench"])
def test_nproc_is_capped_at_the_cores(command, flowroll_data, tmp_path, monkeypatch, capsys):
    """--nproc above the CPU cores (no GPU) is refused unless --force-nproc; no process starts."""
    import torch

    started = []

    def popen(cmd, **kwargs):
        started.append(cmd)
        raise _Started

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    argv = [command, "--preset", "ultra-tiny", "--nproc", "99"]
    if command == "train":
        argv += ["--data", str(flowroll_data), f"logging.runs_dir={tmp_path}"]
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert "--nproc 99 is more processes than this machine has: 2 CPU core(s)" in err, err
    assert "--force-nproc" in err and len(err.strip().splitlines()) == 1, err
    assert not started and not any(tmp_path.iterdir())
    with pytest.raises(_Started):
        cli_main([*argv, "--force-nproc"])
    assert "--nproc_per_node=99" in started[0]
