"""End-to-end `lmlab prepare` throughput against raw `Tokenizer.encode_batch` on the same text.

Input: tinyshakespeare concatenated 20 times (../shared/data by default). A byte-level BPE
tokenizer is trained once beforehand, so both sides measure tokenization, not training.
`prepare` is timed end to end (reading, splitting, encoding, writing shards, checksums,
manifest); the raw side is one `encode_batch` call over the same documents. Runs alternate
and the best of each is reported. Prints one JSON object.

    python benchmarks/prepare_throughput.py [--copies 20] [--vocab-size 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from lmlab.data.corpus import Corpus
from lmlab.data.prepare import prepare
from lmlab.data.tokenizer import load_tokenizer, train_bpe
from lmlab.runs.provenance import source_commit

DEFAULT_TEXT = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "input.txt"
        source.write_text(args.text.read_text(encoding="utf-8") * args.copies, encoding="utf-8")
        corpus = Corpus([str(source)])
        docs = [d.text for d in corpus.documents()]
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        train_bpe(docs[: len(docs) // args.copies], args.vocab_size).save(tmp / "tok")
        tok = load_tokenizer(tmp / "tok")

        raw_s, prepare_s = [], []
        for i in range(args.repeats):
            t = time.perf_counter()
            encodings = tok.tokenizer.encode_batch(docs, add_special_tokens=False)
            raw_s.append(time.perf_counter() - t)
            tokens = sum(len(e.ids) for e in encodings)
            del encodings
            out = tmp / f"data{i}"
            t = time.perf_counter()
            manifest = prepare([str(source)], out, str(tmp / "tok"), log=lambda *_: None)
            prepare_s.append(time.perf_counter() - t)
            shutil.rmtree(out)

    mb = text_bytes / 1e6
    raw_mb_s, prepare_mb_s = mb / min(raw_s), mb / min(prepare_s)
    commit = source_commit()
    print(
        json.dumps(
            {
                "benchmark": "prepare_throughput",
                "commit": commit,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "text_mb": round(mb, 3),
                "documents": len(docs),
                "tokens": tokens,
                "vocab_size": args.vocab_size,
                "raw_encode_batch_mb_s": round(raw_mb_s, 3),
                "prepare_mb_s": round(prepare_mb_s, 3),
                "prepare_vs_raw": round(prepare_mb_s / raw_mb_s, 3),
                "raw_s": [round(x, 3) for x in raw_s],
                "prepare_s": [round(x, 3) for x in prepare_s],
                "prepare_tokens": sum(s["tokens"] for s in manifest["splits"].values()),
                "target_prepare_vs_raw": 0.9,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
