"""`lmlab eval`: validation loss, perplexity and bits per byte of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmlab.data.shards import load_manifest, open_split
from lmlab.data.tokenizer import load_tokenizer
from lmlab.errors import UserError
from lmlab.eval.metrics import bytes_per_token, evaluate_loss
from lmlab.train.checkpoint import build_from_checkpoint
from lmlab.train.device import select_device


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    split: str = "val",
    batches: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate a run folder or checkpoint on a data directory (default: the run's own data)."""
    torch_device = select_device(device)
    model, tokenizer, cfg, path = build_from_checkpoint(checkpoint, torch_device)
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
    return {"checkpoint": str(path), "data": str(data), "split": split, **result}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab eval",
        description="Evaluate a checkpoint: loss, perplexity and bits per byte on a data split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmlab eval runs/tiny/20261123-101500\n"
        "  lmlab eval runs/tiny/20261123-101500/checkpoints/step_00001000 --data data/flowroll --json",
    )
    parser.add_argument("checkpoint", metavar="RUN_DIR|CKPT")
    parser.add_argument(
        "--data", default=None, metavar="DATA_DIR", help="data directory (default: the run's)"
    )
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument(
        "--batches", type=int, default=0, help="batches to evaluate (default 0 = the whole split)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="sequences per batch (default: the run's)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.batches < 0 or (args.batch_size is not None and args.batch_size <= 0):
        raise UserError("--batches must be >= 0 and --batch-size positive")
    with torch.inference_mode():
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            split=args.split,
            batches=args.batches,
            batch_size=args.batch_size,
            device=args.device,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        bpb = result.get("val_bits_per_byte")
        print(
            f"{result['checkpoint']} on {result['data']} ({args.split}, {result['val_tokens']:,} tokens): "
            f"loss {result['val_loss']:.4f} | perplexity {result['val_perplexity']:.2f}"
            + (f" | bits/byte {bpb:.4f}" if bpb is not None else "")
        )
    return 0
