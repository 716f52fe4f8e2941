"""Validation loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from lmlab.data.loader import TokenLoader, count_windows
from lmlab.data.shards import TokenSplit


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    split: TokenSplit,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    device: torch.device,
    bytes_per_token: float | None = None,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """Mean next-token loss over the first `max_batches` batches of `split` (0 = all).

    Windows are read in order, so every evaluation sees the same tokens. Bits per byte
    divides the total loss in bits by the text bytes those tokens stand for, estimated from
    the split's bytes-per-token ratio: it compares models across tokenizers.
    """
    windows = max(1, sum(count_windows(split, seq_len)))
    loader = TokenLoader(split, min(batch_size, windows), seq_len, shuffle=False)
    n_batches = (
        loader.batches_per_epoch if max_batches <= 0 else min(max_batches, loader.batches_per_epoch)
    )
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for _ in range(n_batches):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with autocast or nullcontext():
                loss = model(x, y)[1]
            total += loss.double() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    mean = total.item() / count
    result = {"val_loss": mean, "val_perplexity": math.exp(min(mean, 700.0)), "val_tokens": count}
    if bytes_per_token:
        result["val_bits_per_byte"] = mean / math.log(2) / bytes_per_token
    return result


def bytes_per_token(manifest: dict, split: str = "val") -> float | None:
    """Text bytes per token of a split, from the manifest (end-of-document tokens included)."""
    info = manifest["splits"][split]
    return info["text_bytes"] / info["tokens"] if info["tokens"] else None
