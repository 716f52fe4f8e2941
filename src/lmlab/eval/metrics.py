"""Validation loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from lmlab.data.loader import TokenLoader, count_windows
from lmlab.data.shards import TokenSplit, load_manifest, open_split
from lmlab.data.tokenizer import load_tokenizer
from lmlab.errors import UserError
from lmlab.runs.device import select_device
from lmlab.runs.load import build_from_checkpoint


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
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    loader = TokenLoader(split, min(batch_size, windows), seq_len, shuffle=False, vocab_size=vocab)
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


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    split: str = "val",
    batches: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
    quantize: str | None = None,
) -> dict:
    """Evaluate a run folder or checkpoint on a data directory (default: the run's own data);
    `quantize="int8"` evaluates the model with int8 linear layers."""
    torch_device = select_device(device)
    model, tokenizer, cfg, path = build_from_checkpoint(checkpoint, torch_device, quantize=quantize)
    data = data or cfg.data.path
    manifest = load_manifest(data)
    data_tok = load_tokenizer(Path(data) / manifest["tokenizer"]["file"])
    if data_tok.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{data} uses a vocabulary of {data_tok.vocab_size:,} tokens, larger than the model's {cfg.model.vocab_size:,}"
        )
    if data_tok.to_json() != tokenizer.to_json():
        raise UserError(
            f"{data} was tokenized with a different tokenizer than {path}; losses would be meaningless"
        )
    result = evaluate_loss(
        model,
        open_split(data, split),
        batch_size=batch_size or cfg.train.micro_batch_size,
        seq_len=cfg.seq_len,
        max_batches=batches,
        device=torch_device,
        bytes_per_token=bytes_per_token(manifest, split),
    )
    quantized = {"quantize": quantize} if quantize else {}
    return {"checkpoint": str(path), "data": str(data), "split": split, **quantized, **result}
