"""`lmlab generate`: continue a prompt with a trained model, streaming to the terminal."""

from __future__ import annotations

import argparse
import sys

import torch

from lmlab.commands.predict import add_quantize_argument
from lmlab.errors import UserError
from lmlab.generate.text import generate_text
from lmlab.runs.device import select_device
from lmlab.runs.load import build_from_checkpoint


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab generate",
        description="Generate text from a run folder or checkpoint (works on a CPU-only laptop).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        '  lmlab generate runs/quickstart/20261123-101500 --prompt "[3 1 2] | sort =>" --temperature 0\n'
        '  lmlab generate runs/shakespeare/20261123-101500 --prompt "ROMEO:" --max-new-tokens 300 --top-k 40 --seed 1\n'
        '  lmlab generate runs/shakespeare/20261123-101500 --prompt "ROMEO:" --quantize int8',
    )
    parser.add_argument("checkpoint", metavar="RUN_DIR|CKPT")
    parser.add_argument(
        "--prompt", default="", help="text to continue (default: start a new document)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument(
        "--no-stop", action="store_true", help="keep going past the end-of-document token"
    )
    add_quantize_argument(parser)
    args = parser.parse_args(argv)
    model, tokenizer, _, _ = build_from_checkpoint(
        args.checkpoint, select_device(args.device), quantize=args.quantize
    )
    unknown = tokenizer.unknown_characters(args.prompt)
    if unknown:  # the model would read <|unk|> for each: not the prompt the user wrote
        shown = " ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise UserError(
            f"the prompt has characters outside the model's vocabulary: {shown}; "
            "use only characters of its training data"
        )
    with torch.inference_mode():
        pieces = generate_text(
            model,
            tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_at_end_of_document=not args.no_stop,
        )
        first = next(pieces, "")  # a prompt that does not fit fails here, before any output
        sys.stdout.write(args.prompt + first)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
