"""Batches of training windows from memory-mapped shards, with an exact, resumable cursor.

The token stream of each shard is cut into windows of `seq_len + 1` tokens at stride
`seq_len` (inputs and next-token targets overlap by one token). Each epoch visits every
window once, in an order drawn from `seed` and the epoch number. The whole loader state is
therefore two integers (epoch, position), saved in every checkpoint, so a resumed run
reads exactly the batches an uninterrupted run would have read.

With several processes, each global batch of `batch_size * world_size` windows is dealt
out so that rank r takes its own disjoint slice.

Windows start in the middle of documents; lmlab.data.packing places whole documents into
rows instead (data.packing=best_fit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmlab.data.shards import TokenSplit
from lmlab.errors import UserError


def count_windows(split: TokenSplit, seq_len: int) -> list[int]:
    """Windows of `seq_len + 1` tokens at stride `seq_len` in each shard of `split`."""
    return [max(0, (len(s) - 1) // seq_len) for s in split.shards]


class TokenLoader:
    """Shuffled, epoch-based windows over a split; `state_dict()` captures the cursor.

    Data that grows (shards appended to the split, `lmlab prepare --append`) joins at an
    epoch boundary: the epoch in progress finishes over the windows it started with (its
    order is a permutation of those), and the next epoch shuffles all of them. Appended
    shards come after the existing ones, so existing windows keep their ids.
    """

    def __init__(
        self,
        split: TokenSplit,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        vocab_size: int | None = None,
        eot_id: int | None = None,
    ):
        """With `vocab_size`, every window read is checked for token ids beyond it (one max
        over the batch; a corrupt shard would otherwise crash the embedding lookup). With
        `eot_id`, batches carry a third tensor, each token's document in its window (a new
        one begins at every EOT input, as in lmlab.data.packing), for data.doc_mask."""
        self.shards, self.batch_size, self.seq_len = split.shards, batch_size, seq_len
        self.files, self.vocab_size, self.eot_id = split.files, vocab_size, eot_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        windows = count_windows(split, seq_len)
        self.first_window = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)
        self.num_windows = int(self.first_window[-1])
        self.global_batch = batch_size * world_size
        if self.num_windows < self.global_batch:
            raise UserError(
                f"too little data: the split holds {self.num_windows} windows of {seq_len + 1} tokens, "
                f"one batch needs {self.global_batch}; use a smaller batch or seq_len, or more data"
            )
        self.epoch, self.position = 0, 0
        self.epoch_windows = self.num_windows  # the windows the epoch in progress deals out
        self._order_epoch, self._order = -1, None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    @property
    def utilisation(self) -> float:
        """Share of row positions that are real tokens: all of them (no padding)."""
        return 1.0

    def describe(self) -> str:
        """For the start-up line: empty unless documents are masked."""
        return "concat packing (document mask)" if self.eot_id is not None else ""

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(
                    self.epoch_windows
                )
            else:
                self._order = np.arange(self.epoch_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_windows(self) -> np.ndarray:
        """This rank's window ids for the next batch; advances the cursor."""
        if self.position + self.global_batch > self.epoch_windows:
            self.epoch, self.position = self.epoch + 1, 0  # drop the ragged end of an epoch
            self.epoch_windows = self.num_windows  # windows of grown data join here
        order = self._epoch_order()
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return order[start : start + self.batch_size]

    def read(self, window_ids: np.ndarray) -> torch.Tensor:
        """Tokens of the given windows, (B, seq_len + 1) int64."""
        rows = np.empty((len(window_ids), self.seq_len + 1), dtype=np.int64)
        shard_ids = np.searchsorted(self.first_window, window_ids, side="right") - 1
        for row, (w, s) in enumerate(zip(window_ids, shard_ids, strict=True)):
            start = int(w - self.first_window[s]) * self.seq_len
            rows[row] = self.shards[s][start : start + self.seq_len + 1]
        if self.vocab_size is not None and rows.size and rows.max() >= self.vocab_size:
            self._out_of_vocab(rows, window_ids, shard_ids)
        return torch.from_numpy(rows)

    def _out_of_vocab(self, rows: np.ndarray, window_ids: np.ndarray, shard_ids: np.ndarray):
        row, col = np.argwhere(rows >= self.vocab_size)[0]
        s = int(shard_ids[row])
        offset = int(window_ids[row] - self.first_window[s]) * self.seq_len + int(col)
        name = self.files[s] if self.files else f"shard {s}"
        raise UserError(
            f"{name} holds token id {int(rows[row, col])} at token {offset:,}, beyond the "
            f"vocabulary ({self.vocab_size:,}): the shard is corrupt (`lmlab data verify` checks "
            "every shard; prepare the data again)"
        )

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(inputs, targets), each (B, seq_len) int64 on the CPU; with `eot_id`, also the
        document ids (B, seq_len)."""
        rows = self.read(self.next_windows())
        x, y = rows[:, :-1], rows[:, 1:]
        if self.eot_id is None:
            return x, y
        return x, y, (x == self.eot_id).cumsum(dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "epoch_windows": self.epoch_windows,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; refuses a state from different data or batch geometry. Data
        that grew since is taken: its new windows join at the next epoch."""
        for key in ("seq_len", "seed"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume the data cursor: {key} was {state[key]}, now {getattr(self, key)} "
                    "(the batch shape changed)"
                )
        if state["num_windows"] > self.num_windows:
            raise UserError(
                f"cannot resume the data cursor: the split held {state['num_windows']:,} windows, "
                f"now {self.num_windows:,} (data was removed; only appended data can join a run)"
            )
        self.epoch_windows = state.get("epoch_windows", state["num_windows"])
        # A different world size or micro-batch with the same data keeps the epoch and the
        # number of windows consumed: the same order is dealt out in the new geometry.
        self.epoch, self.position = state["epoch"], state["position"]
