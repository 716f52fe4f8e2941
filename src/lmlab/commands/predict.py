"""`lmlab predict`: generate a prediction for every record of a JSONL file or practice language."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  lmlab predict runs/quickstart/20261124-101500 --input dsl:flowroll:200 --out preds.jsonl
  lmlab predict runs/faq-lora/20261124-101500 --input questions.jsonl --out preds.jsonl --stop "\\n\\n"
  lmlab predict exported/faq --input chats.jsonl --out preds.jsonl --temperature 0.7 --seed 1
  lmlab score --predictions preds.jsonl

Input records are {"prompt": ...} (continued as is) or {"messages": [...]} (through the
model's chat template; a final assistant turn becomes the "reference"); dsl:NAME[:N] takes
N test programs of a practice language. The output keeps every input field and adds
"prediction". Greedy by default; batched, and equal to generating one record at a time."""


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation options `lmlab predict` and `lmlab compare` share."""
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop string, \\n and \\t understood (repeatable); dsl: inputs stop at a newline",
    )
    parser.add_argument(
        "--no-stop-at-eot", action="store_true", help="keep going past the end-of-text token"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (8)")
    parser.add_argument("--prompt-field", default="prompt", help="field holding the prompt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """`--quantize int8`, which generate, predict, chat and eval share."""
    from lmlab.model.config import QUANTIZATIONS

    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=None,
        help="int8: weight-only int8 linear layers, a quarter of float32's weight memory "
        "(slower than float32 on a CPU; outputs change slightly)",
    )


def predict_options(args: argparse.Namespace):
    """PredictOptions from the arguments add_generation_arguments added, checked."""
    from lmlab.generate.predict import PredictOptions

    options = PredictOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=[s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop],
        stop_at_eot=not args.no_stop_at_eot,
        batch_size=args.batch_size,
        prompt_field=args.prompt_field,
    )
    options.check()
    return options


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab predict",
        description="Generate predictions for a file of prompts with an lmlab run, a LoRA run "
        "or an exported Hugging Face folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("model", metavar="RUN|CKPT|HF_DIR")
    parser.add_argument("--input", "-i", required=True, metavar="FILE.jsonl|dsl:NAME[:N]")
    parser.add_argument("--out", "-o", required=True, metavar="PREDS.jsonl")
    add_generation_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_quantize_argument(parser)
    args = parser.parse_args(argv)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from lmlab.errors import UserError
    from lmlab.generate.predict import predict, read_inputs, write_predictions
    from lmlab.runs.device import select_device
    from lmlab.runs.load import load_model

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name a .jsonl file")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists: choose another --out, or pass --overwrite")
    options = predict_options(args)
    records = read_inputs(args.input, args.limit)
    loaded = load_model(args.model, select_device(args.device), quantize=args.quantize)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("predicting", total=len(records))
        predictions = predict(
            loaded, records, options, on_progress=lambda done: progress.update(task, completed=done)
        )
    write_predictions(out, predictions)
    print(f"wrote {len(predictions)} predictions to {out}")
    return 0
