"""Compressed token shards: independently decodable frames with an index (`--compress`).

A raw shard (lmlab.data.shards) is memory-mapped and read in place. A compressed shard
cuts the same token stream into frames of `frame_tokens` tokens (the last may be shorter),
compresses each on its own with lz4 or zstd, and ends with an index, so a reader decodes
only the frames a window touches:

    offset        size  field
    0             8     magic  b"LMLABTKZ"
    8             4     format version (uint32), currently 1
    12            4     dtype code (uint32): 2 = uint16, 4 = uint32 (bytes per token)
    16            8     token count (uint64)
    24            4     codec (uint32): 1 = lz4, 2 = zstd
    28            4     tokens per frame (uint32)
    32            8     index offset (uint64)
    40            8     frame count (uint64)
    48            16    reserved, zero
    64            ...   the frames, back to back
    index offset  24 per frame: offset (uint64), stored bytes, tokens, CRC-32 of the
                        stored bytes, reserved (uint32 each)

The header is written last (zeros until then), so a shard cut short by a crash claims no
frames. The CRC-32 covers a frame's stored (compressed) bytes and is checked before every
decode: a damaged frame is reported, by shard and frame, before the decoder sees it.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from lmlab.errors import UserError
from lmlab.fileio import atomic_write_bytes, sha256_file

Compression = Literal["lz4", "zstd"]
COMPRESSIONS: tuple[str, ...] = get_args(Compression)

MAGIC = b"LMLABTKZ"
FRAME_VERSION = 1
HEADER_BYTES = 64
FRAME_TOKENS = 8192
"""Tokens per frame. A random window of 1,025 tokens decodes one frame (two where it
straddles a boundary), so smaller frames read faster and compress a little worse: on BPE
tokens (benchmarks/loader_throughput.py, one core) lz4 frames of 8,192 tokens read 51.7M
tokens/s at a ratio of 1.29, 16,384 read 37.5M at 1.35, 65,536 read 15.3M at 1.46."""
CACHE_FRAMES = 8
"""Recently decoded frames each shard keeps (8 x 8,192 uint16 tokens = 128 KiB)."""

_HEADER = struct.Struct("<8sIIQIIQQ")  # magic .. frame count, then reserved
_INDEX = np.dtype([("offset", "<u8"), ("bytes", "<u4"), ("tokens", "<u4"), ("crc32", "<u4"), ("reserved", "<u4")])  # fmt: skip
_DTYPE_BY_CODE = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_EXTENSION = {"lz4": ".lz4", "zstd": ".zst"}
_PACKAGE = {"lz4": "lz4", "zstd": "zstandard"}


@dataclass(frozen=True)
class Codec:
    """One compression method: its file code, and compress/decompress of a frame's bytes."""

    name: str
    code: int
    compress: Any
    decompress: Any
    """(stored bytes, decoded size in bytes) -> bytes"""
    error: tuple[type[BaseException], ...]


def load_codec(name: str) -> Codec:
    """The codec called `name`; a one-line error when its package is not installed."""
    if name not in COMPRESSIONS:
        raise UserError(f"unknown compression {name!r}: choose {' or '.join(COMPRESSIONS)}")
    try:
        if name == "lz4":
            import lz4.block

            # High-compression mode: ~1.35x on BPE ids instead of ~1.17x, decoded as fast;
            # level 4 still compresses ~60 MB/s, well ahead of tokenization.
            return Codec(
                name,
                1,
                lambda data: lz4.block.compress(
                    data, mode="high_compression", compression=4, store_size=False
                ),
                lambda data, size: lz4.block.decompress(data, uncompressed_size=size),
                (lz4.block.LZ4BlockError,),
            )
        import zstandard

        compressor, decompressor = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        return Codec(
            name,
            2,
            compressor.compress,
            lambda data, size: decompressor.decompress(data, max_output_size=size),
            (zstandard.ZstdError,),
        )
    except ImportError:
        raise UserError(
            f"{name} compression needs the {_PACKAGE[name]} package: pip install 'lmlab[compress]'"
        ) from None


_CODEC_BY_CODE = {1: "lz4", 2: "zstd"}


def is_compressed(path: str | Path) -> bool:
    """Whether `path` starts like a compressed shard."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


class CompressedShardWriter:
    """ShardWriter's interface (`write`, `close`, `num_tokens`, `state`, `restore`) for
    compressed shards: numbered files of at most `shard_tokens` tokens in frames."""

    def __init__(
        self,
        directory: Path,
        prefix: str,
        dtype: np.dtype,
        shard_tokens: int,
        compression: str,
        frame_tokens: int = FRAME_TOKENS,
        first_index: int = 0,
    ):
        """`first_index` numbers the first shard (an append continues the numbering)."""
        self.directory, self.prefix, self.first_index = Path(directory), prefix, first_index
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.codec, self.frame_tokens = load_codec(compression), frame_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._count = 0  # tokens of the open shard, those still pending included
        self._frames: list[tuple[int, int, int, int]] = []  # (offset, bytes, tokens, crc32)
        self._pending = np.zeros(0, dtype=self.dtype)  # tokens not yet in a frame

    def _name(self, number: int) -> Path:
        number += self.first_index
        return self.directory / f"{self.prefix}_{number:06d}{_EXTENSION[self.codec.name]}"

    def _open_next(self) -> None:
        self._path = self._name(len(self.shards))
        self._file = open(self._path, "wb")  # noqa: SIM115 - closed in _close_current
        self._file.write(bytes(HEADER_BYTES))
        self._count, self._frames = 0, []

    def _write_frame(self, tokens: np.ndarray) -> None:
        data = self.codec.compress(tokens.tobytes())
        offset = self._file.tell()
        self._file.write(data)
        self._frames.append((offset, len(data), tokens.size, zlib.crc32(data)))

    def _close_current(self) -> None:
        if self._file is None:
            return
        if self._pending.size:
            self._write_frame(self._pending)
            self._pending = self._pending[:0]
        index = np.zeros(len(self._frames), dtype=_INDEX)
        for i, (offset, nbytes, tokens, crc) in enumerate(self._frames):
            index[i] = (offset, nbytes, tokens, crc, 0)
        index_offset = self._file.tell()
        self._file.write(index.tobytes())
        self._file.seek(0)
        self._file.write(self._header(index_offset))
        self._file.close()
        self._file = None
        self._pending_path().unlink(missing_ok=True)
        self.shards.append(
            {
                "file": self._path.name,
                "tokens": self._count,
                "frames": len(self._frames),
                "bytes": self._path.stat().st_size,
                "sha256": sha256_file(self._path),
            }
        )

    def _header(self, index_offset: int) -> bytes:
        return _HEADER.pack(
            MAGIC,
            FRAME_VERSION,
            self.dtype.itemsize,
            self._count,
            self.codec.code,
            self.frame_tokens,
            index_offset,
            len(self._frames),
        ).ljust(HEADER_BYTES, b"\0")

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                self._open_next()
            room = self.shard_tokens - self._count
            head, tokens = tokens[:room], tokens[room:]
            self._count += head.size
            pending = np.concatenate([self._pending, head])
            full = pending.size - pending.size % self.frame_tokens
            for start in range(0, full, self.frame_tokens):
                self._write_frame(pending[start : start + self.frame_tokens])
            self._pending = pending[full:].copy()
            if self._count >= self.shard_tokens:
                self._close_current()

    def _pending_path(self) -> Path:
        return self._path.with_name(self._path.name + ".pending")

    def state(self) -> dict[str, Any]:
        """Where the writer is, made durable: finished shards, the open shard's frames, and
        its pending tokens (written beside it, `NAME.pending`)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            if self._pending.size:
                atomic_write_bytes(self._pending_path(), self._pending.tobytes())
        return {
            "shards": list(self.shards),
            "open": self._file is not None,
            "count": self._count,
            "frames": [list(f) for f in self._frames],
            "pending": int(self._pending.size),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state` after a crash: the open shard is cut back to its recorded
        frames and its pending tokens read back."""
        self.shards = list(state["shards"])
        if not state["open"]:
            return
        self._path = self._name(len(self.shards))
        self._frames = [tuple(f) for f in state["frames"]]
        end = self._frames[-1][0] + self._frames[-1][1] if self._frames else HEADER_BYTES
        pending = np.zeros(0, dtype=self.dtype)
        if state["pending"]:
            raw = self._pending_path().read_bytes() if self._pending_path().is_file() else b""
            pending = np.frombuffer(raw, dtype=self.dtype)
        if not self._path.is_file() or self._path.stat().st_size < end:
            raise UserError(f"{self._path} is shorter than the progress record says: cannot resume")
        if pending.size < state["pending"]:
            raise UserError(f"{self._pending_path()} is missing or short: cannot resume")
        self._pending = pending[: state["pending"]].copy()
        self._file = open(self._path, "r+b")  # noqa: SIM115 - closed in _close_current
        self._file.truncate(end)
        self._file.seek(end)
        self._count = state["count"]

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard and return the manifest entries of all shards."""
        self._close_current()
        return self.shards

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._count


class CompressedShard:
    """A compressed shard read like a 1-D token array: `len`, slices (decoding only the
    frames they touch, with a small cache of recent frames) and `np.asarray`."""

    ndim = 1

    def __init__(self, path: str | Path, cache_frames: int = CACHE_FRAMES):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_BYTES:
                raise UserError(f"{path}: too short to be a compressed token shard")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, version, code, num_tokens, codec, frame_tokens, index_offset, num_frames = (
            _HEADER.unpack_from(self._map)
        )
        if magic != MAGIC:
            raise UserError(f"{path}: not a compressed lmlab token shard (bad magic)")
        if version != FRAME_VERSION:
            raise UserError(
                f"{path}: compressed shard version {version} is not supported by this lmlab "
                f"(reads version {FRAME_VERSION}); upgrade lmlab or re-run `lmlab prepare`"
            )
        if code not in _DTYPE_BY_CODE or codec not in _CODEC_BY_CODE:
            raise UserError(f"{path}: unknown token dtype {code} or codec {codec}")
        if index_offset == 0 or size != index_offset + num_frames * _INDEX.itemsize:
            raise UserError(
                f"{path}: size {size} bytes does not match its index: the shard is truncated or corrupt"
            )
        self.dtype, self.frame_tokens = _DTYPE_BY_CODE[code], frame_tokens
        self.codec = load_codec(_CODEC_BY_CODE[codec])
        index = np.frombuffer(self._map, dtype=_INDEX, count=num_frames, offset=index_offset)
        ends = index["offset"].astype(np.int64) + index["bytes"]
        full = index["tokens"][:-1] == frame_tokens
        if (
            int(index["tokens"].sum()) != num_tokens
            or not full.all()
            or (num_frames and (index["offset"][0] != HEADER_BYTES or ends[-1] != index_offset))
            or (index["offset"][1:] != ends[:-1]).any()
        ):
            raise UserError(f"{path}: its frame index is inconsistent: the shard is corrupt")
        # Plain lists: indexing them is several times faster than a numpy record.
        self._offsets, self._bytes = index["offset"].tolist(), index["bytes"].tolist()
        self._tokens, self._crc32 = index["tokens"].tolist(), index["crc32"].tolist()
        self._view = memoryview(self._map)
        self.shape = (num_tokens,)
        self.num_frames, self.cache_frames = num_frames, cache_frames
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.shape[0]

    def decode_frame(self, frame: int) -> np.ndarray:
        """Frame `frame`'s tokens, after checking its CRC-32 and token count."""
        stored = self._view[self._offsets[frame] : self._offsets[frame] + self._bytes[frame]]
        if zlib.crc32(stored) != self._crc32[frame]:
            raise UserError(
                f"{self._where(frame)} fails its checksum: the shard is corrupt "
                "(`lmlab data verify` checks every frame; prepare the data again)"
            )
        size = self._tokens[frame] * self.dtype.itemsize
        try:
            data = self.codec.decompress(stored, size)
        except self.codec.error as e:
            raise UserError(
                f"{self._where(frame)} does not decode ({e}): the shard is corrupt"
            ) from None
        if len(data) != size:
            raise UserError(
                f"{self._where(frame)} decodes to {len(data) // self.dtype.itemsize:,} tokens, "
                f"the index says {self._tokens[frame]:,}: the shard is corrupt"
            )
        return np.frombuffer(data, dtype=self.dtype)

    def _where(self, frame: int) -> str:
        """The frame, for an error message (built only when one is raised)."""
        start = frame * self.frame_tokens
        return f"{self.path}: frame {frame} (tokens {start:,} to {start + self._tokens[frame]:,})"

    def _frame(self, frame: int) -> np.ndarray:
        tokens = self._cache.get(frame)
        if tokens is None:
            tokens = self._cache[frame] = self.decode_frame(frame)
            if len(self._cache) > self.cache_frames:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(frame)
        return tokens

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} is outside a shard of {len(self)} tokens")
            return self._frame(i // self.frame_tokens)[i % self.frame_tokens]
        if not isinstance(key, slice):
            return np.asarray(self)[key]
        start, stop, step = key.indices(len(self))
        if step != 1:
            return self[start:stop][::step] if step > 0 else np.asarray(self)[key]
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first, last = start // self.frame_tokens, (stop - 1) // self.frame_tokens
        base = first * self.frame_tokens
        if first == last:
            return self._frame(first)[start - base : stop - base]
        out = np.empty(stop - start, dtype=self.dtype)
        for frame in range(first, last + 1):
            # A long read (a whole-shard scan) goes around the cache instead of flushing it.
            short = last - first < self.cache_frames
            tokens = self._frame(frame) if short else self.decode_frame(frame)
            lo = frame * self.frame_tokens
            a, b = max(start, lo), min(stop, lo + len(tokens))
            out[a - start : b - start] = tokens[a - lo : b - lo]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        tokens = self[0 : len(self)]
        return tokens if dtype is None else tokens.astype(dtype)

    def verify_frames(self) -> list[str]:
        """Decode every frame, checking its CRC-32 and token count; the problems found."""
        problems = []
        for frame in range(self.num_frames):
            try:
                self.decode_frame(frame)
            except UserError as e:
                problems.append(str(e))
        return problems
