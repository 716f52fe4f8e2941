"""A preallocated key/value cache for incremental decoding.

Attention layers call `update(layer_idx, k, v)` with the keys and values of the new
positions and attend over everything cached so far. Models read `seq_len` before their
first layer runs, to offset positions (RoPE angles, GPT-2's position table); the cache
advances `seq_len` when the last layer has written, so every layer of one forward pass
writes at the same offset.
"""

from __future__ import annotations

import torch

from lmlab.model.config import ModelConfig


class KVCache:
    """Per-layer K and V buffers, each (batch_size, n_kv_head, max_len, head_dim)."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.n_layer = n_layer
        self.max_len = max_len
        self.seq_len = 0  # positions cached so far, identical for every layer between passes

    @classmethod
    def for_config(
        cls,
        cfg: ModelConfig,
        batch_size: int = 1,
        max_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache sized for a model with config cfg (max_len defaults to its context)."""
        max_len = cfg.context_length if max_len is None else max_len
        return cls(
            cfg.n_layer,
            batch_size,
            cfg.n_kv_head,
            max_len,
            cfg.head_dim,
            dtype=dtype,
            device=device,
        )

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) after the cached positions; return all of
        them, (B, n_kv_head, seq_len + T, head_dim), as views of the buffers."""
        start, end = self.seq_len, self.seq_len + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        if layer_idx == self.n_layer - 1:  # every layer has written this pass's positions
            self.seq_len = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (1-D indices), in that order: a batch whose
        finished sequences are dropped stops spending compute on them."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def reset(self) -> None:
        """Forget the cached positions (the buffers are overwritten, not freed)."""
        self.seq_len = 0
