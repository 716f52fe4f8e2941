"""Compressed token shards (`lmlab prepare --compress`, lmlab.data.frames) read exactly as
raw ones, and a damaged frame is caught (issue 13, item 4)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lmlab.commands.data import main as data_main
from lmlab.commands.prepare import main as prepare_main
from lmlab.config import build_config
from lmlab.data.frames import FRAME_TOKENS, CompressedShard, CompressedShardWriter
from lmlab.data.loader import TokenLoader
from lmlab.data.packing import PackedLoader
from lmlab.data.prepare import prepare
from lmlab.data.shards import open_split, verify
from lmlab.errors import UserError
from lmlab.train.loop import train

pytest.importorskip("lz4")
pytest.importorskip("zstandard")

SHARD_TOKENS = 40_000  # three train shards, each ending in a short frame


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """The same documents prepared raw, with lz4 and with zstd."""
    root = tmp_path_factory.mktemp("compressed")
    out = {}
    for compress in (None, "lz4", "zstd"):
        out[compress or "raw"] = root / (compress or "raw")
        prepare(
            ["dsl:flowroll:3000"],
            out[compress or "raw"],
            "char",
            shard_tokens=SHARD_TOKENS,
            compress=compress,
            log=lambda *_: None,
        )
    return out


def stream(data: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in open_split(data, split).shards])


@pytest.mark.parametrize("compress", ["lz4", "zstd"])
def test_compressed_shards_hold_the_raw_token_stream(prepared, compress):
    manifest = json.loads((prepared[compress] / "manifest.json").read_text())
    assert manifest["compression"] == compress and manifest["frame_tokens"] == FRAME_TOKENS
    raw_manifest = json.loads((prepared["raw"] / "manifest.json").read_text())
    assert "compression" not in raw_manifest  # the raw format is unchanged
    train_shards = manifest["splits"]["train"]["shards"]
    assert len(train_shards) == 3
    assert [e["frames"] for e in train_shards] == [
        -(-e["tokens"] // FRAME_TOKENS) for e in train_shards
    ]
    assert all(e["frames"] >= 2 for e in train_shards)
    for split in ("train", "val"):
        assert np.array_equal(stream(prepared[compress], split), stream(prepared["raw"], split))
        shards = open_split(prepared[compress], split).shards
        assert all(isinstance(s, CompressedShard) for s in shards)
    raw_bytes = sum(e["bytes"] for e in raw_manifest["splits"]["train"]["shards"])
    assert sum(e["bytes"] for e in train_shards) < raw_bytes
    assert verify(prepared[compress]) == []


@pytest.mark.parametrize("compress", ["lz4", "zstd"])
def test_random_windows_read_as_raw(prepared, compress):
    raw = open_split(prepared["raw"], "train")
    packed = open_split(prepared[compress], "train")
    rng = np.random.default_rng(0)
    for raw_shard, shard in zip(raw.shards, packed.shards, strict=True):
        n = len(raw_shard)
        assert len(shard) == n and shard.dtype == raw_shard.dtype
        cuts = [FRAME_TOKENS - 1, FRAME_TOKENS, 2 * FRAME_TOKENS + 5]
        starts = [*rng.integers(0, n, 40), 0, *[c for c in cuts if c < n]]
        for start in starts:
            for width in (1, 33, 1025, FRAME_TOKENS + 7):
                a, b = raw_shard[start : start + width], shard[start : start + width]
                assert np.array_equal(a, b) and b.dtype == a.dtype
        for key in (0, n - 1, -1, -n):
            assert shard[key] == raw_shard[key]
        for key in (slice(None, None, 3), slice(-50, None), slice(None, None, -1), slice(5, 5)):
            assert np.array_equal(shard[key], raw_shard[key])
        with pytest.raises(IndexError):
            shard[n]
    a = TokenLoader(raw, batch_size=16, seq_len=64, seed=3)
    b = TokenLoader(packed, batch_size=16, seq_len=64, seed=3)
    for _ in range(20):
        assert np.array_equal(a.next_batch()[0], b.next_batch()[0])
    eot = json.loads((prepared["raw"] / "manifest.json").read_text())["tokenizer"]["eot_id"]
    a = PackedLoader(raw, batch_size=8, seq_len=64, eot_id=eot, doc_ids=True)
    b = PackedLoader(packed, batch_size=8, seq_len=64, eot_id=eot, doc_ids=True)
    assert a.num_documents == b.num_documents
    for _ in range(10):
        for x, y in zip(a.next_batch(), b.next_batch(), strict=True):
            assert np.array_equal(x, y)


def test_training_on_compressed_shards_is_bit_identical(prepared, tmp_path: Path):
    def losses(data: Path) -> list[float]:
        cfg = build_config(
            "ultra-tiny",
            overrides=[
                f"data.path={data}",
                f"logging.runs_dir={tmp_path / data.name}",
                "model.context_length=32",
                "train.micro_batch_size=4",
                "train.tokens_per_step=256",
                "train.max_steps=4",
                "train.warmup_steps=2",
                "train.device=cpu",
                "eval.interval=2",
                "eval.batches=2",
                "logging.interval=1",
                "logging.tensorboard=false",
            ],
        )
        result = train(cfg, log=lambda *a, **k: None)
        return [r.get("loss", r.get("val_loss")) for r in result.history]

    raw = losses(prepared["raw"])
    assert len(raw) >= 4
    assert losses(prepared["lz4"]) == raw
    assert losses(prepared["zstd"]) == raw


def _flip_byte_in_frame(data: Path, frame: int) -> Path:
    """Flip one byte in the middle of `frame` of the second train shard."""
    path = data / "train_000001.lz4"
    shard = CompressedShard(path)
    at = shard._offsets[frame] + shard._bytes[frame] // 2
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x40
    path.write_bytes(bytes(blob))
    return path


def test_a_flipped_byte_is_caught_by_verify_and_the_loader(prepared, tmp_path: Path, capsys):
    data = tmp_path / "damaged"
    shutil.copytree(prepared["lz4"], data)
    path = _flip_byte_in_frame(data, frame=1)
    problems = verify(data)
    assert any(f"{path}: frame 1 (tokens" in p and "fails its checksum" in p for p in problems)
    assert not any("frame 0" in p or "frame 2" in p for p in problems)
    assert data_main(["verify", str(data)]) == 1
    assert "frame 1" in capsys.readouterr().err

    split = open_split(data, "train")  # opening reads no frame
    loader = TokenLoader(split, batch_size=16, seq_len=64, seed=0)
    with pytest.raises(UserError) as caught:
        for _ in range(loader.batches_per_epoch):
            loader.next_batch()
    message = str(caught.value)
    assert "\n" not in message
    assert f"{path}: frame 1 " in message and "lmlab data verify" in message
    # Frames around it still read.
    assert len(split.shards[1][:FRAME_TOKENS]) == FRAME_TOKENS


def test_a_damaged_index_or_truncated_shard_is_refused(prepared, tmp_path: Path):
    data = tmp_path / "cut"
    shutil.copytree(prepared["zstd"], data)
    path = data / "train_000000.zst"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated or corrupt"):
        open_split(data, "train")
    assert any("train_000000.zst" in p for p in verify(data))


@pytest.mark.parametrize(("compress", "modules"), [("lz4", ["lz4", "lz4.block"]), ("zstd", ["zstandard"])])  # fmt: skip
def test_a_missing_package_names_the_extra(prepared, tmp_path, monkeypatch, compress, modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'lmlab\[compress\]'") as caught:
        prepare(["dsl:flowroll:50"], tmp_path / "x", "char", compress=compress, log=print)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    with pytest.raises(UserError, match=r"lmlab\[compress\]"):
        open_split(prepared[compress], "train")


@pytest.mark.parametrize("compress", ["lz4", "zstd"])
def test_the_writer_resumes_to_identical_bytes(tmp_path: Path, compress):
    tokens = np.random.default_rng(1).integers(0, 300, 100_000).astype(np.uint16)

    def write(directory: Path, stop_at: int | None) -> list[dict]:
        directory.mkdir()
        writer = CompressedShardWriter(directory, "train", np.uint16, 45_000, compress, 4096)
        for piece in np.array_split(tokens, 17):
            writer.write(piece)
            if stop_at is not None and writer.num_tokens >= stop_at:
                state = json.loads(json.dumps(writer.state()))  # as progress.json holds it
                writer.write(np.full(9000, 7, dtype=np.uint16))  # written after the record
                writer._file.close()  # the crash
                writer = CompressedShardWriter(
                    directory, "train", np.uint16, 45_000, compress, 4096
                )
                writer.restore(state)
                stop_at = None
        return writer.close()

    straight, resumed = write(tmp_path / "a", None), write(tmp_path / "b", 50_000)
    assert straight == resumed and [e["tokens"] for e in straight] == [45_000, 45_000, 10_000]
    for entry in straight:
        assert (tmp_path / "a" / entry["file"]).read_bytes() == (
            tmp_path / "b" / entry["file"]
        ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [e["file"] for e in straight]
    read = np.concatenate(
        [np.asarray(CompressedShard(tmp_path / "b" / e["file"])) for e in straight]
    )
    assert np.array_equal(read, tokens)


def test_prepare_cli_takes_compress(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    args = ["--input", "dsl:flowroll:200", "--tokenizer", "char", "--out", str(out)]
    assert prepare_main([*args, "--compress", "zstd"]) == 0
    assert "train_000000.zst" in capsys.readouterr().out
    assert data_main(["verify", str(out)]) == 0
    with pytest.raises(SystemExit):
        prepare_main([*args, "--compress", "gzip"])
