"""Data integrity at train time (issue 14, item 3): shard headers, sizes and token counts
checked against the manifest at start, token ids bounds-checked as windows are read, and
train.verify_data=true for the full checksum pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmlab.cli import main as cli_main
from lmlab.data.loader import TokenLoader
from lmlab.data.shards import HEADER_BYTES, load_manifest, open_split
from lmlab.errors import UserError


@pytest.fixture
def data(flowroll_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(flowroll_data, copy)
    return copy


def first_train_shard(data: Path) -> Path:
    return data / load_manifest(data)["splits"]["train"]["shards"][0]["file"]


def train_cli(data: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    argv = [
        "train",
        "--preset",
        "ultra-tiny",
        "--data",
        str(data),
        f"logging.runs_dir={tmp_path / 'runs'}",
        "train.max_steps=3",
        "train.device=cpu",
        "eval.interval=0",
        "logging.tensorboard=false",
        *extra,
    ]
    try:
        cli_main(argv)
    except SystemExit as e:
        return int(e.code or 0), ""
    return 0, ""


def test_token_ids_beyond_the_vocabulary_are_caught_where_they_are_read(data: Path):
    shard = first_train_shard(data)
    raw = bytearray(shard.read_bytes())
    itemsize = 2  # a char vocabulary is stored as uint16
    position = 1234
    raw[HEADER_BYTES + position * itemsize : HEADER_BYTES + (position + 1) * itemsize] = (
        60000
    ).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    split = open_split(data, "train")
    loader = TokenLoader(split, 4, 32, shuffle=False, vocab_size=100)
    with pytest.raises(UserError, match=rf"{shard.name} holds token id 60000 at token 1,234"):
        for _ in range(loader.batches_per_epoch):
            loader.next_batch()
    unchecked = TokenLoader(split, 4, 32, shuffle=False)  # without a vocabulary: no check
    for _ in range(unchecked.batches_per_epoch):
        unchecked.next_batch()


def test_training_on_out_of_vocabulary_ids_is_one_line(data: Path, tmp_path: Path, capsys):
    for entry in load_manifest(data)["splits"]["train"]["shards"]:
        path = data / entry["file"]
        n = (path.stat().st_size - HEADER_BYTES) // 2
        path.write_bytes(path.read_bytes()[:HEADER_BYTES] + np.full(n, 60000, "<u2").tobytes())
    code, _ = train_cli(data, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "beyond the vocabulary" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "count", "missing", "list", "no-splits"])
def test_damaged_data_is_refused_before_training(damage, data: Path, tmp_path: Path, capsys):
    shard, manifest_path = first_train_shard(data), data / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "count":
        manifest["splits"]["train"]["shards"][0]["tokens"] += 1
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "missing":
        shard.unlink()
    elif damage == "list":
        manifest_path.write_text("[1, 2, 3]")
    else:
        del manifest["splits"]
        manifest_path.write_text(json.dumps(manifest))
    code, _ = train_cli(data, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_a_flipped_byte_is_caught_by_verify_data(data: Path, tmp_path: Path, capsys):
    shard = first_train_shard(data)
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 10] ^= 0x01  # a valid id still: only the checksum sees it
    shard.write_bytes(bytes(raw))
    assert train_cli(data, tmp_path / "a")[0] == 0  # the default checks cannot see it
    code, _ = train_cli(data, tmp_path / "b", "train.verify_data=true")
    err = capsys.readouterr().err
    assert code == 2 and "fails verification" in err and "checksum mismatch" in err
