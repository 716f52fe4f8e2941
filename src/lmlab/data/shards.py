"""Token shards: flat binary files of token ids with a versioned header, plus a manifest.

Shard layout (little-endian):

    offset  size  field
    0       8     magic  b"LMLABTOK"
    8       4     format version (uint32), currently 1
    12      4     dtype code (uint32): 2 = uint16, 4 = uint32 (bytes per token)
    16      8     token count (uint64)
    24      40    reserved, zero
    64      ...   token ids

The manifest (`manifest.json`) lists every shard with its token count and SHA-256, the
tokenizer's identity, and what produced the data. Readers memory-map shards, so training
touches only the pages it reads.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import UserError
from lmlab.fileio import sha256_file

MAGIC = b"LMLABTOK"
SHARD_VERSION = 1
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")  # magic, version, dtype code, token count
_DTYPE_BY_CODE = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary under 65,536), else uint32."""
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<u4")


def pack_header(dtype: np.dtype, num_tokens: int) -> bytes:
    code = np.dtype(dtype).itemsize
    if code not in _DTYPE_BY_CODE:
        raise ValueError(f"unsupported shard dtype {dtype}")
    return _HEADER.pack(MAGIC, SHARD_VERSION, code, num_tokens).ljust(HEADER_BYTES, b"\0")


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    num_tokens: int


def read_header(path: str | Path) -> ShardHeader:
    """Read and check a shard header; refuses unknown magic, versions and dtypes."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path}: too short to be a token shard")
    magic, version, code, num_tokens = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise UserError(f"{path}: not an lmlab token shard (bad magic)")
    if version != SHARD_VERSION:
        raise UserError(
            f"{path}: shard format version {version} is not supported by this lmlab "
            f"(reads version {SHARD_VERSION}); upgrade lmlab or re-run `lmlab prepare`"
        )
    if code not in _DTYPE_BY_CODE:
        raise UserError(f"{path}: unknown token dtype code {code}")
    return ShardHeader(version, _DTYPE_BY_CODE[code], num_tokens)


def open_shard(path: str | Path) -> np.memmap:
    """Memory-map a shard's tokens (read-only) after checking its header and size; a
    compressed shard (lmlab.data.frames) opens as a CompressedShard, read like an array."""
    from lmlab.data import frames  # imported here: frames is the optional format

    if frames.is_compressed(path):
        return frames.CompressedShard(path)
    header = read_header(path)
    expected = HEADER_BYTES + header.num_tokens * header.dtype.itemsize
    actual = Path(path).stat().st_size
    if actual != expected:
        raise UserError(
            f"{path}: size {actual} bytes, header says {expected}: the shard is truncated or corrupt"
        )
    if header.num_tokens == 0:
        return np.zeros(0, dtype=header.dtype)  # np.memmap refuses empty maps
    return np.memmap(
        path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,)
    )


class ShardWriter:
    """Appends token arrays to numbered shards of at most `shard_tokens` tokens each.

    Shards are written under the caller's (temporary) output directory, which the caller
    renames into place when everything succeeded; a header is written last, so a shard cut
    short by a crash never claims tokens it does not have.
    """

    def __init__(
        self,
        directory: Path,
        prefix: str,
        dtype: np.dtype,
        shard_tokens: int,
        first_index: int = 0,
    ):
        """`first_index` numbers the first shard (an append continues the numbering)."""
        self.directory, self.prefix, self.first_index = Path(directory), prefix, first_index
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._count = 0

    def _open_next(self) -> None:
        name = f"{self.prefix}_{self.first_index + len(self.shards):06d}.bin"
        self._path = self.directory / name
        self._file = open(self._path, "wb")  # noqa: SIM115 - closed in _close_current
        self._file.write(pack_header(self.dtype, 0))
        self._count = 0

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(pack_header(self.dtype, self._count))
        self._file.close()
        self._file = None
        self.shards.append(
            {
                "file": self._path.name,
                "tokens": self._count,
                "bytes": self._path.stat().st_size,
                "sha256": sha256_file(self._path),
            }
        )

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                self._open_next()
            room = self.shard_tokens - self._count
            head, tokens = tokens[:room], tokens[room:]
            self._file.write(head.tobytes())
            self._count += head.size
            if self._count >= self.shard_tokens:
                self._close_current()

    def state(self) -> dict[str, Any]:
        """Where the writer is, made durable: the finished shards' entries and the tokens of
        the open one, flushed and synced to disk (`restore` continues from here)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"shards": list(self.shards), "open": self._file is not None, "count": self._count}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a writer from `state` after a crash: the open shard is cut back to the
        tokens `state` recorded (what was written after it is dropped)."""
        self.shards = list(state["shards"])
        if not state["open"]:
            return
        self._path = self.directory / f"{self.prefix}_{self.first_index + len(self.shards):06d}.bin"
        size = HEADER_BYTES + state["count"] * self.dtype.itemsize
        if not self._path.is_file() or self._path.stat().st_size < size:
            raise UserError(f"{self._path} is shorter than the progress record says: cannot resume")
        self._file = open(self._path, "r+b")  # noqa: SIM115 - closed in _close_current
        self._file.truncate(size)
        self._file.seek(size)
        self._count = state["count"]

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard and return the manifest entries of all shards."""
        self._close_current()
        return self.shards

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._count


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read a data directory's manifest, with one-line errors for the usual mistakes."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"data directory {data_dir} does not exist: create it with `lmlab prepare`")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{data_dir} has no {MANIFEST_NAME}: it is not a prepared data directory (run `lmlab prepare`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise UserError(
            f"{path} is not a manifest (a JSON {type(manifest).__name__}, not an object)"
        )
    version = manifest.get("version")
    if manifest.get("format") != "lmlab-token-shards" or version != MANIFEST_VERSION:
        raise UserError(
            f"{path}: unsupported manifest (format {manifest.get('format')!r}, version {version!r})"
        )
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("shards"), list) for s in splits.values()
    ):
        raise UserError(f"{path} has no valid 'splits' (the manifest is damaged)")
    if not isinstance(manifest.get("tokenizer"), dict) or "file" not in manifest["tokenizer"]:
        raise UserError(f"{path} names no tokenizer file (the manifest is damaged)")
    return manifest


@dataclass
class TokenSplit:
    """All shards of one split, memory-mapped, addressed as one long token stream."""

    shards: list[np.ndarray]
    files: list[Path] | None = None
    """The shards' paths, for error messages."""

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)


def open_split(data_dir: str | Path, split: str) -> TokenSplit:
    """Memory-map every shard of `split` ("train" or "val") listed in the manifest, after
    checking each one's header, size and token count against the manifest (no token is
    read: `verify` reads them all)."""
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise UserError(f"{data_dir} has no {split!r} split (has: {', '.join(manifest['splits'])})")
    shards, files = [], []
    for entry in manifest["splits"][split]["shards"]:
        path = Path(data_dir) / entry["file"]
        if not path.is_file():
            raise UserError(f"{path} is missing: the data directory is incomplete")
        tokens = open_shard(path)
        if len(tokens) != entry.get("tokens"):
            raise UserError(
                f"{path} holds {len(tokens):,} tokens, the manifest says {entry.get('tokens')}: "
                "the shard was changed or replaced"
            )
        shards.append(tokens)
        files.append(path)
    return TokenSplit(shards, files)


def verify(data_dir: str | Path) -> list[str]:
    """Check every shard against the manifest: header, size, token count and SHA-256.

    Returns a list of problems, empty when the directory is intact.
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    problems = []
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            path = data_dir / entry["file"]
            if not path.is_file():
                problems.append(f"{split}: {entry['file']} is missing")
                continue
            try:
                tokens = open_shard(path)
            except UserError as e:
                problems.append(f"{split}: {e}")
                continue
            if len(tokens) != entry["tokens"]:
                problems.append(
                    f"{split}: {entry['file']} has {len(tokens)} tokens, manifest says {entry['tokens']}"
                )
            if sha256_file(path) != entry["sha256"]:
                problems.append(
                    f"{split}: {entry['file']} checksum mismatch (file changed or corrupt)"
                )
            if hasattr(tokens, "verify_frames"):  # compressed: decode and check every frame
                problems += [f"{split}: {problem}" for problem in tokens.verify_frames()]
    tok_file = data_dir / manifest["tokenizer"]["file"]
    if not tok_file.is_file():
        problems.append(f"tokenizer file {tok_file.name} is missing")
    else:
        import hashlib

        digest = hashlib.sha256(tok_file.read_bytes()).hexdigest()
        if digest != manifest["tokenizer"]["sha256"]:
            problems.append(f"tokenizer file {tok_file.name} does not match the manifest's sha256")
    return problems
