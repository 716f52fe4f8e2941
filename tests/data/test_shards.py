import struct
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.shards import (
    HEADER_BYTES,
    ShardWriter,
    dtype_for_vocab,
    open_shard,
    pack_header,
    read_header,
)
from lmlab.errors import UserError


def test_header_roundtrip(tmp_path: Path):
    path = tmp_path / "s.bin"
    tokens = np.array([0, 1, 65535, 7], dtype=np.uint16)
    path.write_bytes(pack_header(np.uint16, len(tokens)) + tokens.tobytes())
    header = read_header(path)
    assert header.version == 1 and header.dtype == np.uint16 and header.num_tokens == 4
    np.testing.assert_array_equal(open_shard(path), tokens)


def test_unknown_version_and_magic_refused(tmp_path: Path):
    path = tmp_path / "s.bin"
    raw = bytearray(pack_header(np.uint16, 0))
    struct.pack_into("<I", raw, 8, 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="version 99 is not supported"):
        read_header(path)
    path.write_bytes(b"NOTASHRD" + bytes(HEADER_BYTES - 8))
    with pytest.raises(UserError, match="bad magic"):
        read_header(path)


def test_truncated_shard_refused(tmp_path: Path):
    path = tmp_path / "s.bin"
    path.write_bytes(pack_header(np.uint32, 10) + np.arange(5, dtype=np.uint32).tobytes())
    with pytest.raises(UserError, match="truncated"):
        open_shard(path)


@pytest.mark.parametrize(
    "vocab,dtype", [(256, np.uint16), (65535, np.uint16), (65536, np.uint32), (200_000, np.uint32)]
)
def test_dtype_choice(vocab, dtype):
    assert dtype_for_vocab(vocab) == dtype


def test_writer_splits_into_shards(tmp_path: Path):
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint32), shard_tokens=10)
    data = np.arange(25, dtype=np.uint32) + 70000
    writer.write(data[:7])
    writer.write(data[7:])
    entries = writer.close()
    assert [e["tokens"] for e in entries] == [10, 10, 5]
    back = np.concatenate([open_shard(tmp_path / e["file"]) for e in entries])
    np.testing.assert_array_equal(back, data)
    assert all(len(e["sha256"]) == 64 for e in entries)
