"""`lmlab prepare --append` (issue 13, item 2): new documents become new shards and a new
manifest revision; existing shards are not rewritten; documents already there are skipped;
a run resumes on the grown data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.config import build_config
from lmlab.data.prepare import prepare
from lmlab.data.shards import verify
from lmlab.errors import UserError
from lmlab.train.loop import train

QUIET = {"log": lambda *a: None}


def paragraphs(n: int, start: int = 0) -> str:
    return (
        "\n\n".join(
            f"Paragraph {i}: the {['cat', 'dog', 'owl'][i % 3]} counted to {i * 7}."
            for i in range(start, start + n)
        )
        + "\n\n"
    )  # every paragraph ends the same way, wherever it is


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "first.txt").write_text(paragraphs(3000))
    prepare([str(tmp_path / "first.txt")], tmp_path / "data", "char", **QUIET)
    return tmp_path / "data"


def snapshot(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.glob("*.bin"))}


def test_append_adds_shards_and_skips_what_is_there(data: Path, tmp_path: Path):
    before = snapshot(data)
    old = json.loads((data / "manifest.json").read_text())
    # 1000 paragraphs already in the data, 2000 new ones.
    (tmp_path / "more.txt").write_text(paragraphs(3000, start=2000))
    manifest = prepare([str(tmp_path / "more.txt")], data, append=True, **QUIET)
    assert manifest["revision"] == 2
    entry = manifest["history"][-1]
    assert entry["duplicates_skipped"] == 1000 and entry["documents"] == 2000
    for name, content in before.items():  # old shards untouched, and listed as before
        assert (data / name).read_bytes() == content
    for split in ("train", "val"):
        assert (
            manifest["splits"][split]["shards"][: len(old["splits"][split]["shards"])]
            == (old["splits"][split]["shards"])
        )
        assert manifest["splits"][split]["tokens"] == sum(
            e["tokens"] for e in manifest["splits"][split]["shards"]
        )
    assert sorted(p.name for p in data.glob("*.bin")) == [
        "train_000000.bin",
        "train_000001.bin",
        "val_000000.bin",
        "val_000001.bin",
    ]
    assert verify(data) == []
    assert not list(data.glob(".append-*")) and not (data / "doc_hashes.r1.npy").exists()
    with pytest.raises(UserError, match="nothing to add: every document"):
        prepare([str(tmp_path / "more.txt")], data, append=True, **QUIET)
    assert json.loads((data / "manifest.json").read_text())["revision"] == 2


def test_append_needs_a_data_directory(tmp_path: Path):
    (tmp_path / "t.txt").write_text(paragraphs(10))
    with pytest.raises(UserError, match="does not exist"):
        prepare([str(tmp_path / "t.txt")], tmp_path / "nope", append=True, **QUIET)


def test_a_run_continues_on_appended_data(data: Path, tmp_path: Path):
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={tmp_path / 'runs'}",
            "model.context_length=32",
            "train.micro_batch_size=8",
            "train.max_steps=30",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    run = train(cfg, stop_at_step=10, log=lambda *a, **k: None).run_dir
    (tmp_path / "more.txt").write_text(paragraphs(2000, start=5000))
    prepare([str(tmp_path / "more.txt")], data, append=True, **QUIET)
    lines: list[str] = []
    result = train(cfg, resume=run, log=lambda *a, **k: lines.append(a[0]))
    assert result.state.step == 30
    assert any("manifest revision 1 -> 2" in x for x in lines)


@pytest.mark.parametrize("compress", ["lz4", "zstd"])
def test_append_to_compressed_shards(tmp_path: Path, compress: str):
    (tmp_path / "first.txt").write_text(paragraphs(3000))
    data = tmp_path / "data"
    prepare([str(tmp_path / "first.txt")], data, "char", compress=compress, **QUIET)
    before = snapshot_all(data)
    (tmp_path / "more.txt").write_text(paragraphs(3000, start=2000))
    manifest = prepare([str(tmp_path / "more.txt")], data, append=True, **QUIET)
    suffix = ".lz4" if compress == "lz4" else ".zst"
    assert [e["file"] for e in manifest["splits"]["train"]["shards"]] == [
        f"train_000000{suffix}",
        f"train_000001{suffix}",
    ]
    assert manifest["compression"] == compress
    for name, content in before.items():
        assert (data / name).read_bytes() == content
    assert verify(data) == []
    with pytest.raises(UserError, match="--append writes the same kind"):
        prepare(
            [str(tmp_path / "first.txt")],
            data,
            append=True,
            compress="zstd" if compress == "lz4" else "lz4",
            **QUIET,
        )


def snapshot_all(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.suffix in (".lz4", ".zst")}
