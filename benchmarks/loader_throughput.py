"""Compressed token cache (issue 13, item 4): compression ratio and loader throughput of raw,
lz4 and zstd shards. Prints JSON.

The data is tinyshakespeare (../shared/data, next to the repository) repeated --copies
times, prepared once raw with a bpe:4096 tokenizer trained by lmlab, and again with
`--compress lz4` and `--compress zstd` using that tokenizer. The ratio is the train
split's raw shard bytes over its compressed shard bytes.

Throughput is tokens per second of `TokenLoader.read` on one core (torch and numpy on one
thread): batches of --batch random windows of --seq-len + 1 tokens, as training reads
them. Each window decodes the frame it lies in (two where it crosses a frame boundary)
unless that frame is among the shard's lmlab.data.frames.CACHE_FRAMES most recent ones;
with the default sizes the split is about 150 frames, so most reads decode a frame, as
on a data set far larger than the cache. The variants are read in turn, --rounds times,
and the medians are reported. Besides the prepared shards (frames of
lmlab.data.frames.FRAME_TOKENS), the same tokens are also written with frames of 16,384
and 65,536 tokens to show what the frame size costs.

    python benchmarks/loader_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmlab.data.frames import (  # noqa: E402
    CACHE_FRAMES,
    FRAME_TOKENS,
    CompressedShard,
    CompressedShardWriter,
)
from lmlab.data.loader import TokenLoader  # noqa: E402
from lmlab.data.prepare import prepare  # noqa: E402
from lmlab.data.shards import TokenSplit, open_split  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def shard_bytes(split: TokenSplit) -> int:
    return sum(f.stat().st_size for f in split.files)


def rewrite(split: TokenSplit, folder: Path, compress: str, frame_tokens: int) -> TokenSplit:
    """The split's tokens written again as compressed shards with other frames."""
    folder.mkdir()
    writer = CompressedShardWriter(folder, "train", split.shards[0].dtype, 10**9, compress, frame_tokens)  # fmt: skip
    for shard in split.shards:
        writer.write(np.asarray(shard))
    entries = writer.close()
    files = [folder / e["file"] for e in entries]
    return TokenSplit([CompressedShard(f) for f in files], files)


def tokens_per_s(split: TokenSplit, batches: int, batch: int, seq_len: int, seed: int) -> float:
    loader = TokenLoader(split, batch_size=batch, seq_len=seq_len, seed=seed)
    started = time.perf_counter()
    for _ in range(batches):
        loader.read(loader.next_windows())
    return batches * batch * (seq_len + 1) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="tinyshakespeare repeated (8)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=300, help="batches per timing (300)")
    parser.add_argument("--rounds", type=int, default=7, help="times each variant is read (7)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = root / "shakespeare.txt"
        text.write_text(SHAKESPEARE.read_text(encoding="utf-8") * args.copies, encoding="utf-8")
        quiet = {"log": lambda *_: None}
        timing = {}
        started = time.perf_counter()
        prepare([str(text)], root / "raw", "bpe:4096", **quiet)
        timing["raw"] = time.perf_counter() - started
        splits = {"raw": open_split(root / "raw", "train")}
        for compress in ("lz4", "zstd"):
            started = time.perf_counter()
            prepare([str(text)], root / compress, str(root / "raw"), compress=compress, **quiet)
            timing[compress] = time.perf_counter() - started
            splits[compress] = open_split(root / compress, "train")
        for compress, frame_tokens in (("lz4", 16384), ("lz4", 65536), ("zstd", 65536)):
            name = f"{compress}_frames_{frame_tokens}"
            splits[name] = rewrite(splits["raw"], root / name, compress, frame_tokens)
        for split in splits.values():  # the same tokens in every variant
            assert np.array_equal(np.asarray(split.shards[0]), np.asarray(splits["raw"].shards[0]))

        speeds: dict[str, list[float]] = {name: [] for name in splits}
        for round_ in range(args.rounds):
            for name, split in splits.items():
                speeds[name].append(
                    tokens_per_s(split, args.batches, args.batch, args.seq_len, seed=round_)
                )
        raw_bytes = shard_bytes(splits["raw"])
        result = {
            "data": f"tinyshakespeare x{args.copies}, bpe:4096 (uint16 ids), train split",
            "train_tokens": splits["raw"].num_tokens,
            "frame_tokens": FRAME_TOKENS,
            "cache_frames_per_shard": CACHE_FRAMES,
            "window_tokens": args.seq_len + 1,
            "batch": args.batch,
            "threads": 1,
            "prepare_s": {k: round(v, 2) for k, v in timing.items()},
            "variants": {
                name: {
                    "bytes": shard_bytes(split),
                    "compression_ratio": round(raw_bytes / shard_bytes(split), 3),
                    "frames": sum(getattr(s, "num_frames", 0) for s in split.shards),
                    "tokens_per_s_median": round(statistics.median(speeds[name])),
                    "tokens_per_s_min_max": [round(min(speeds[name])), round(max(speeds[name]))],
                }
                for name, split in splits.items()
            },
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu": _cpu_name(),
        }
    print(json.dumps(result, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
