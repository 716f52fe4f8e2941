"""Packing (issue 13, item 5): how full the rows are, and how fast the loaders read them.
Prints JSON.

The data is synthetic and web-like: document lengths drawn from a lognormal with median
400 tokens and sigma 1.0 (mean ~660, 1% of documents over ~4,100 tokens), at least one
token, each followed by EOT, random token ids, in two shards held in memory. For each
context (row length) it reports:

- concat (data.packing=concat, TokenLoader): every position is a real token (utilisation
  1.0), but rows start in the middle of documents and documents are cut across rows;
- in_order_whole_documents: what keeping documents whole costs without reordering them
  (next-fit: documents in order, a new row when the next one does not fit, long ones
  split into row-sized pieces), the baseline that concat plus a document mask is usually
  compared with;
- best_fit (data.packing=best_fit, PackedLoader): best-fit decreasing over buffers of
  lmlab.data.packing.BUFFER_DOCS documents; the only rows that start mid-document are the
  second and later pieces of documents longer than a row.

Throughput is rows per second of `next_batch()` (batches of --batch rows, with document
ids, as data.doc_mask reads them), after the epoch's plan is made; planning an epoch and
finding the documents are timed on their own.

    python benchmarks/packing.py --docs 40000
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from lmlab.data.loader import TokenLoader
from lmlab.data.packing import BUFFER_DOCS, PackedLoader, find_documents
from lmlab.data.shards import TokenSplit

EOT = 0


def web_like(n_docs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard of `n_docs` documents (lognormal lengths, median 400) and the lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, np.round(rng.lognormal(np.log(400), 1.0, n_docs))).astype(np.int64)
    tokens = rng.integers(1, 50_000, int(lengths.sum()) + n_docs).astype(np.uint16)
    tokens[np.cumsum(lengths + 1) - 1] = EOT
    return tokens, lengths


def concat_stats(split: TokenSplit, seq_len: int) -> dict:
    """Windows that start mid-document; documents cut across windows; documents wholly
    inside one window that a window boundary could have spared (shorter than a row)."""
    docs = find_documents(split, EOT)
    windows, mid, cut, cut_short = 0, 0, 0, 0
    for s, tokens in enumerate(split.shards):
        n_windows = (len(tokens) - 1) // seq_len
        windows += n_windows
        starts = np.arange(n_windows) * seq_len
        doc_starts = docs.start[docs.shard == s]
        mid += int(n_windows - np.isin(starts, doc_starts).sum())
        lengths = docs.length[docs.shard == s]
        first, last = doc_starts // seq_len, (doc_starts + lengths - 1) // seq_len
        crossing = first != last
        cut += int(crossing.sum())
        cut_short += int((crossing & (lengths <= seq_len)).sum())
    return {
        "utilisation": 1.0,
        "rows": windows,
        "rows_starting_mid_document": round(mid / windows, 4),
        "documents_cut_across_rows": round(cut / len(docs), 4),
        "documents_cut_that_fit_a_row": round(cut_short / len(docs), 4),
    }


def next_fit_utilisation(split: TokenSplit, seq_len: int) -> float:
    docs = find_documents(split, EOT)
    rows, real, free = 0, 0, 0
    for n in docs.length.tolist():
        real += n
        full, rest = divmod(n, seq_len)
        rows += full
        if rest > free:
            rows, free = rows + 1, seq_len
        free -= rest
    return round(real / (rows * seq_len), 4)


def rows_per_s(loader, batches: int) -> float:
    loader.next_batch()  # the first batch plans the epoch (PackedLoader) or warms up
    began = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return round(batches * loader.batch_size / (time.perf_counter() - began), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=40_000, help="documents per shard (two shards)")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch")
    parser.add_argument("--batches", type=int, default=300, help="batches timed per loader")
    args = parser.parse_args()
    (a, len_a), (b, len_b) = web_like(args.docs, 1), web_like(args.docs, 2)
    split = TokenSplit([a, b])
    lengths = np.concatenate([len_a, len_b])
    began = time.perf_counter()
    find_documents(split, EOT)
    find_s = time.perf_counter() - began
    result = {
        "data": {
            "distribution": "lognormal(mu=ln 400, sigma=1.0) tokens per document, min 1, + EOT",
            "documents": int(len(lengths)),
            "tokens": int(split.num_tokens),
            "median_length": float(np.median(lengths)),
            "mean_length": round(float(lengths.mean()), 1),
            "p99_length": float(np.percentile(lengths, 99)),
            "find_documents_s": round(find_s, 3),
        },
        "buffer_docs": BUFFER_DOCS,
        "contexts": {},
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for seq_len in (256, 1024):
        packed = PackedLoader(split, args.batch, seq_len, EOT, seed=0, doc_ids=True)
        plan = packed.epoch_rows(0)
        began = time.perf_counter()
        plan_1 = packed.epoch_rows(1)
        plan_s = time.perf_counter() - began
        docs = find_documents(split, EOT)
        doc_starts = set(zip(docs.shard.tolist(), docs.start.tolist(), strict=True))
        firsts = plan.row_offsets[:-1]
        mid = sum(
            (s, b) not in doc_starts
            for s, b in zip(plan.shard[firsts].tolist(), plan.start[firsts].tolist(), strict=True)
        )
        split_docs = int((lengths > seq_len).sum())
        concat = TokenLoader(split, args.batch, seq_len, seed=0, eot_id=EOT)
        result["contexts"][str(seq_len)] = {
            "concat": {
                **concat_stats(split, seq_len),
                "rows_per_s": rows_per_s(concat, args.batches),
            },
            "in_order_whole_documents": {"utilisation": next_fit_utilisation(split, seq_len)},
            "best_fit": {
                "utilisation": round(plan.utilisation, 5),
                "utilisation_epoch_1": round(plan_1.utilisation, 5),
                "rows": plan.num_rows,
                "rows_starting_mid_document": round(mid / plan.num_rows, 4),
                "documents_split_longer_than_row": round(split_docs / len(lengths), 4),
                "plan_epoch_s": round(plan_s, 3),
                "rows_per_s": rows_per_s(packed, args.batches),
            },
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
