"""Training on data that grows (issue 13, item 3): shards appended to the train split after
a run started join it at the next epoch; any other change to the data is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.config import build_config
from lmlab.data.loader import TokenLoader
from lmlab.data.packing import PackedLoader
from lmlab.data.shards import open_split
from lmlab.errors import UserError
from lmlab.fileio import sha256_file
from lmlab.runs.checkpoint import list_checkpoints, load_state
from lmlab.train.loop import train


@pytest.fixture
def data(flowroll_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(flowroll_data, copy)
    return copy


def grow(data: Path) -> int:
    """Append a train shard (a copy of the first, under the next name) as `prepare --append`
    lays it out: a new shard file, the manifest's lists and counts extended, a new revision."""
    manifest = json.loads((data / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    first = train["shards"][0]
    name = f"train_{len(train['shards']):06d}.bin"
    shutil.copyfile(data / first["file"], data / name)
    train["shards"].append({**first, "file": name, "sha256": sha256_file(data / name)})
    train["tokens"] += first["tokens"]
    manifest["revision"] = manifest.get("revision", 1) + 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    return first["tokens"]


def eot_id(data: Path) -> int:
    return json.loads((data / "manifest.json").read_text())["tokenizer"]["eot_id"]


def config(data: Path, runs: Path, *extra: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "train.micro_batch_size=8",
            "train.max_steps=40",
            "train.device=cpu",
            "eval.interval=0",
            "checkpoint.interval=10",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def test_the_epoch_in_progress_keeps_its_windows_and_new_ones_join_the_next(data: Path):
    before = TokenLoader(open_split(data, "train"), 4, 32, seed=3)
    for _ in range(5):
        before.next_batch()
    state = before.state_dict()
    rest_of_epoch = [before.next_windows() for _ in range(before.batches_per_epoch - 5)]
    old_windows = before.num_windows
    grow(data)
    after = TokenLoader(open_split(data, "train"), 4, 32, seed=3)
    assert after.num_windows > old_windows
    after.load_state_dict(state)
    for expected in rest_of_epoch:  # the same order as if nothing had grown
        assert np.array_equal(after.next_windows(), expected)
    next_epoch = np.concatenate([after.next_windows() for _ in range(after.batches_per_epoch)])
    assert after.epoch == 1 and (next_epoch >= old_windows).any()
    assert len(set(next_epoch.tolist())) == len(next_epoch)  # each window once


def test_best_fit_packing_also_finishes_the_epoch_before_new_documents_join(data: Path):
    eot = eot_id(data)
    before = PackedLoader(open_split(data, "train"), 4, 32, eot, seed=3)
    for _ in range(5):
        before.next_batch()
    state = before.state_dict()
    rest_of_epoch = [before.next_batch() for _ in range(before.batches_per_epoch - 5)]
    old_documents, old_rows = before.num_documents, before.epoch_rows(1).num_rows
    grow(data)
    after = PackedLoader(open_split(data, "train"), 4, 32, eot, seed=3)
    assert after.num_documents == 2 * old_documents
    after.load_state_dict(state)
    for expected in rest_of_epoch:  # the same rows as if nothing had grown
        assert all(torch.equal(a, b) for a, b in zip(after.next_batch(), expected, strict=True))
    after.next_rows()
    assert after.epoch == 1 and after.epoch_documents == after.num_documents
    assert after.batches_per_epoch * 4 > 1.9 * old_rows  # the next epoch packs both halves


def test_best_fit_packing_refuses_documents_that_changed(data: Path):
    eot = eot_id(data)
    state = PackedLoader(open_split(data, "train"), 4, 32, eot, seed=3).state_dict()
    shard = data / "train_000000.bin"
    raw = shard.read_bytes()
    header = len(raw) - 2 * len(open_split(data, "train").shards[0])  # then uint16 tokens
    tokens = np.frombuffer(raw[header:], dtype="<u2").copy()
    cut = int(np.flatnonzero(tokens[1:] == eot)[0]) + 1  # the first EOT after the first token
    tokens[cut] = tokens[cut + 1]  # goes: two documents become one, as many tokens as before
    shard.write_bytes(raw[:header] + tokens.tobytes())
    with pytest.raises(UserError, match="do not begin with them"):
        PackedLoader(open_split(data, "train"), 4, 32, eot, seed=3).load_state_dict(state)


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_a_run_resumes_on_grown_data(packing: str, data: Path, tmp_path: Path):
    extra = (f"data.packing={packing}",)
    run = train(config(data, tmp_path, *extra), stop_at_step=10, log=lambda *a, **k: None).run_dir
    assert load_state(list_checkpoints(run)[-1])["data"]["revision"] == 1
    added = grow(data)
    lines: list[str] = []
    result = train(
        config(data, tmp_path, *extra), resume=run, log=lambda *a, **k: lines.append(a[0])
    )
    assert result.state.step == 40
    assert any(
        f"grew by 1 shard(s), {added:,} tokens (manifest revision 1 -> 2)" in x for x in lines
    )
    saved = load_state(list_checkpoints(run)[-1])
    assert saved["data"]["revision"] == 2 and len(saved["data"]["train_shards"]) == 2
    unit = "windows" if packing == "concat" else "documents"
    loader = saved["loader"]
    assert loader[f"num_{unit}"] > loader[f"epoch_{unit}"] or loader["epoch"] > 0


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_other_changes_to_the_data_are_refused(change, data: Path, tmp_path: Path):
    grow(data)
    run = train(config(data, tmp_path), stop_at_step=10, log=lambda *a, **k: None).run_dir
    manifest = json.loads((data / "manifest.json").read_text())
    train_split = manifest["splits"]["train"]
    if change == "rewritten":
        shard = data / train_split["shards"][0]["file"]
        raw = bytearray(shard.read_bytes())
        raw[100] = raw[101]  # still valid ids; the manifest is made to agree
        shard.write_bytes(bytes(raw))
        train_split["shards"][0]["sha256"] = sha256_file(shard)
        match = "train_000000.bin was rewritten"
    else:
        gone = train_split["shards"].pop()
        train_split["tokens"] -= gone["tokens"]
        match = "train_000001.bin is gone"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=match):
        train(config(data, tmp_path), resume=run, log=lambda *a, **k: None)
