"""Best-fit packing: whole documents placed into rows, each row beginning with a document.

`lmlab prepare` writes a split as one token stream with the end-of-text id (EOT) after
every document. `TokenLoader` cuts that stream into windows, so windows start in the
middle of documents. Here the stream is cut at document boundaries instead. A document,
as the model reads it, is the EOT that ended the previous document followed by its own
tokens (the inputs), and it predicts its tokens and its own closing EOT (the targets):

    stream   a1 a2 EOT b1 b2 b3 EOT c1 ...
    doc a    inputs  a1 a2        targets a2 EOT         (a shard's first: no EOT before)
    doc b    inputs  EOT b1 b2 b3 targets b1 b2 b3 EOT

Every target of the stream belongs to exactly one document, and with `data.doc_mask` no
target depends on another document. A row holds `seq_len` inputs and their targets (the
`seq_len + 1` tokens of a window). Each epoch:

1. the documents are put in an order drawn from (seed, epoch);
2. a document longer than a row is cut into row-sized pieces, each a row of its own, and
   a rest;
3. the rest, `buffer_docs` documents at a time, are placed by best-fit decreasing: the
   longest first, each into the open row whose free space it fills most tightly, else
   into a new row;
4. the epoch's rows are shuffled.

Free space at the end of a row is padding: EOT inputs whose targets are -100 (ignored by
the loss). `utilisation` is the share of target positions that hold a real target.

The plan of an epoch is a pure function of (data, seq_len, seed, epoch, buffer_docs), so
the loader's state is two integers (epoch, position), as TokenLoader's; a resumed run
plans the epoch again and reads exactly the rows an uninterrupted run would have read.
Data that grows (shards appended, `lmlab prepare --append`) joins at an epoch boundary as
in TokenLoader: appended shards come after the old ones, so the old documents keep their
ids; the epoch in progress is planned over the documents it started with, the next one
over all of them.
With several processes, each global batch of `batch_size * world_size` rows is dealt out
so that rank r takes its own slice.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmlab.data.shards import TokenSplit
from lmlab.errors import UserError

BUFFER_DOCS = 8192
"""Documents packed together. More fill rows more tightly (the last rows of a buffer are
the emptiest) at the cost of planning time; 8192 reaches >= 99.5% on web-like lengths at
contexts of 256 and 1024 (benchmarks/packing.py)."""

IGNORE_INDEX = -100
"""Targets the loss ignores (padding)."""


@dataclass
class Documents:
    """Every document of a split: the shard it is in, its first input and its length."""

    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray
    """Inputs (= targets) of each document, int64."""

    def __len__(self) -> int:
        return len(self.length)


def find_documents(split: TokenSplit, eot_id: int) -> Documents:
    """The documents of `split`: in each shard, one begins at its first token and one at
    every EOT but the last token (an EOT there is only a target)."""
    shards, starts, lengths = [], [], []
    for s, tokens in enumerate(split.shards):
        n = len(tokens)
        if n < 2:
            continue
        eots = np.flatnonzero(np.asarray(tokens[: n - 1]) == eot_id)
        begin = np.concatenate([[0], eots[eots > 0]]).astype(np.int64)
        end = np.concatenate([begin[1:], [n - 1]])
        shards.append(np.full(len(begin), s, dtype=np.int64))
        starts.append(begin)
        lengths.append(end - begin)
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return Documents(empty, empty, empty)
    return Documents(np.concatenate(shards), np.concatenate(starts), np.concatenate(lengths))


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """The row of each item (every length <= capacity): longest first, each into the row
    whose free space it fills most tightly, else a new row. Rows are numbered in the order
    they open."""
    row_of = np.empty(len(lengths), dtype=np.int64)
    free: list[tuple[int, int]] = []  # (free space, row) of rows with space left, sorted
    rows = 0
    sizes = lengths.tolist()
    for i in np.argsort(-lengths, kind="stable").tolist():
        size = sizes[i]
        k = bisect_left(free, (size, -1))  # the least free space that still holds it
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row, rows = capacity, rows, rows + 1
        row_of[i] = row
        if space > size:
            insort(free, (space - size, row))
    return row_of


@dataclass
class PackedRows:
    """One epoch's rows: pieces (shard, start, length) stored row by row, and the order in
    which the rows are read."""

    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_offsets: np.ndarray
    """Row r holds pieces row_offsets[r] : row_offsets[r + 1]."""
    order: np.ndarray
    """Rows in reading order."""
    seq_len: int

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def utilisation(self) -> float:
        """Share of the rows' target positions that hold a real target (not padding)."""
        return float(self.length.sum()) / max(1, self.num_rows * self.seq_len)

    def pieces(self, row: int) -> range:
        return range(int(self.row_offsets[row]), int(self.row_offsets[row + 1]))


def pack_documents(
    docs: Documents,
    order: np.ndarray,
    seq_len: int,
    buffer_docs: int,
    rng: np.random.Generator | None,
) -> PackedRows:
    """Rows of `seq_len` inputs from the documents in `order` (steps 2-4 of the module
    docstring); `rng` shuffles the rows (None: rows in the order they were made)."""
    shard, start, length = docs.shard[order], docs.start[order], docs.length[order]
    # 2. Long documents: full rows first, then a rest (possibly empty) that is packed.
    full = length // seq_len
    piece_doc = np.repeat(np.arange(len(order)), full)
    within = np.arange(len(piece_doc)) - np.repeat(np.cumsum(full) - full, full)
    full_start = start[piece_doc] + within * seq_len
    rest = length - full * seq_len
    keep = rest > 0
    rest_shard, rest_start, rest_len = shard[keep], (start + full * seq_len)[keep], rest[keep]
    rest_buffer = np.flatnonzero(keep) // buffer_docs
    # 3. Best-fit decreasing within each buffer of documents.
    rest_row = np.empty(len(rest_len), dtype=np.int64)
    rows = len(piece_doc)
    bounds = np.searchsorted(rest_buffer, np.arange(rest_buffer[-1] + 2)) if len(rest_len) else [0]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:  # a buffer of documents that were all whole rows has nothing left
            local = best_fit_decreasing(rest_len[lo:hi], seq_len)
            rest_row[lo:hi] = rows + local
            rows += int(local.max()) + 1
    # Pieces row by row: full rows hold one piece each; within a packed row, longest first.
    row_of = np.concatenate([np.arange(len(piece_doc)), rest_row])
    by_row = np.lexsort((-np.concatenate([np.full(len(piece_doc), seq_len), rest_len]), row_of))
    counts = np.bincount(row_of, minlength=rows)
    return PackedRows(
        shard=np.concatenate([shard[piece_doc], rest_shard])[by_row],
        start=np.concatenate([full_start, rest_start])[by_row],
        length=np.concatenate([np.full(len(piece_doc), seq_len), rest_len])[by_row],
        row_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        order=rng.permutation(rows) if rng is not None else np.arange(rows),  # 4.
        seq_len=seq_len,
    )


class PackedLoader:
    """Shuffled, epoch-based rows of whole documents (best-fit packing); the same cursor,
    rank slicing and `state_dict()` as TokenLoader."""

    def __init__(
        self,
        split: TokenSplit,
        batch_size: int,
        seq_len: int,
        eot_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        vocab_size: int | None = None,
        doc_ids: bool = False,
        buffer_docs: int = BUFFER_DOCS,
    ):
        """With `doc_ids`, batches carry a third tensor: each token's document in its row
        (data.doc_mask builds the attention mask and positions from it). With `vocab_size`,
        every token read is checked against it, as in TokenLoader."""
        if buffer_docs < 1:
            raise UserError(f"the packing buffer must hold at least 1 document, got {buffer_docs}")
        self.shards, self.files = split.shards, split.files
        self.batch_size, self.seq_len, self.eot_id = batch_size, seq_len, eot_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.vocab_size, self.doc_ids, self.buffer_docs = vocab_size, doc_ids, buffer_docs
        self.documents = find_documents(split, eot_id)
        self.num_documents = len(self.documents)
        self.num_tokens = int(self.documents.length.sum())
        self.global_batch = batch_size * world_size
        self.epoch, self.position = 0, 0
        self.epoch_documents = self.num_documents  # the documents the epoch in progress packs
        self._plan_epoch, self._plan = -1, None
        rows = self._epoch_rows().num_rows
        if rows < self.global_batch:
            raise UserError(
                f"too little data: best-fit packing makes {rows} rows of {seq_len} tokens, "
                f"one batch needs {self.global_batch}; use a smaller batch or seq_len, or more data"
            )

    def epoch_rows(self, epoch: int, num_documents: int | None = None) -> PackedRows:
        """The plan of `epoch` over the first `num_documents` documents (default: all): the
        same for every rank and every resume."""
        n = self.num_documents if num_documents is None else num_documents
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
        else:
            rng, order = None, np.arange(n)
        return pack_documents(self.documents, order, self.seq_len, self.buffer_docs, rng)

    def _epoch_rows(self) -> PackedRows:
        if self._plan_epoch != self.epoch:
            self._plan = self.epoch_rows(self.epoch, self.epoch_documents)
            self._plan_epoch = self.epoch
        return self._plan

    @property
    def utilisation(self) -> float:
        """Share of this epoch's row positions that are real tokens, not padding."""
        return self._epoch_rows().utilisation

    @property
    def batches_per_epoch(self) -> int:
        return self._epoch_rows().num_rows // self.global_batch

    def describe(self) -> str:
        """For the start-up line."""
        mask = ", document mask" if self.doc_ids else ""
        return f"best_fit packing ({self.utilisation:.2%} of row tokens real{mask})"

    def next_rows(self) -> np.ndarray:
        """This rank's row ids (in this epoch's plan) for the next batch; advances the cursor."""
        if self.position + self.global_batch > self._epoch_rows().num_rows:
            self.epoch, self.position = self.epoch + 1, 0  # drop the ragged end of an epoch
            self.epoch_documents = self.num_documents  # documents of grown data join here
        order = self._epoch_rows().order
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return order[start : start + self.batch_size]

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, document ids), each (B, seq_len) int64: pieces side by side,
        then padding (EOT inputs, -100 targets, one more document id)."""
        plan, T = self._epoch_rows(), self.seq_len
        x = np.full((len(rows), T), self.eot_id, dtype=np.int64)
        y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        doc = np.empty((len(rows), T), dtype=np.int64)
        for b, row in enumerate(rows):
            at = 0
            for d, p in enumerate(plan.pieces(int(row))):
                s, start, n = int(plan.shard[p]), int(plan.start[p]), int(plan.length[p])
                tokens = self.shards[s][start : start + n + 1]  # inputs and the last target
                if self.vocab_size is not None and tokens.max() >= self.vocab_size:
                    self._out_of_vocab(s, start, tokens)
                x[b, at : at + n], y[b, at : at + n] = tokens[:-1], tokens[1:]
                doc[b, at : at + n] = d
                at += n
            doc[b, at:] = len(plan.pieces(int(row)))
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(doc)

    def _out_of_vocab(self, shard: int, start: int, tokens: np.ndarray):
        offset = start + int(np.argmax(tokens >= self.vocab_size))
        name = self.files[shard] if self.files else f"shard {shard}"
        raise UserError(
            f"{name} holds token id {int(tokens.max())} at token {offset:,}, beyond the "
            f"vocabulary ({self.vocab_size:,}): the shard is corrupt (`lmlab data verify` checks "
            "every shard; prepare the data again)"
        )

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(inputs, targets), or with doc_ids (inputs, targets, document ids); (B, seq_len)
        int64 on the CPU."""
        x, y, doc = self.read(self.next_rows())
        return (x, y, doc) if self.doc_ids else (x, y)

    def state_dict(self) -> dict[str, Any]:
        return {
            "packing": "best_fit",
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "epoch_documents": self.epoch_documents,
            "seq_len": self.seq_len,
            "buffer_docs": self.buffer_docs,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; refuses a state from other data, packing or row length. Data
        that grew since (documents after the old ones) is taken: it joins at the next epoch."""
        if state.get("packing") != "best_fit":
            raise UserError(
                "cannot resume the data cursor: the run was packed with "
                f"{state.get('packing', 'concat')}, now best_fit"
            )
        for key in ("seq_len", "seed", "buffer_docs"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume the data cursor: {key} was {state[key]}, now {getattr(self, key)} "
                    "(the batch shape changed)"
                )
        before = state["num_documents"]
        if before > self.num_documents or int(self.documents.length[:before].sum()) != int(
            state["num_tokens"]
        ):
            raise UserError(
                f"cannot resume the data cursor: the split held {before:,} documents of "
                f"{state['num_tokens']:,} tokens, now {self.num_documents:,} of {self.num_tokens:,} "
                "that do not begin with them (only appended data can join a run)"
            )
        self.epoch_documents = state.get("epoch_documents", before)
        # As in TokenLoader, another world size or micro-batch deals the same rows out anew.
        self.epoch, self.position = state["epoch"], state["position"]
        self._plan_epoch, self._plan = -1, None
