"""`lmlab eval`: validation loss, perplexity and bits per byte of a checkpoint."""

from __future__ import annotations

import argparse
import json

import torch

from lmlab.errors import UserError
from lmlab.eval.metrics import evaluate_checkpoint


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
