"""`lmlab eval`: validation loss, perplexity and bits per byte of a checkpoint, or accuracy
on multiple-choice tasks (--task)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmlab.commands.predict import add_quantize_argument
from lmlab.errors import UserError
from lmlab.eval.metrics import evaluate_checkpoint

EPILOG = """examples:
  lmlab eval runs/tiny/20261123-101500
  lmlab eval runs/tiny/20261123-101500/checkpoints/step_00001000 --data data/flowroll --json
  lmlab eval runs/tiny/20261123-101500 --task arc_like.jsonl
  lmlab eval exported/tiny --task a.jsonl --task b.jsonl --json --out mc.json
  lmlab eval runs/tiny/20261123-101500 --quantize int8   # the loss with int8 weights

A --task file is JSONL, one {"context": str, "choices": [str, ...], "label": int} per line
(the HellaSwag / ARC shape). Each choice is scored by the log-likelihood of its tokens
after the context; accuracy takes the best sum, acc_norm the best sum per character of the
choice (as lm-evaluation-harness does). Context and choice are joined as they are: put
the space in the choices (" Paris"). With --task, RUN may also be a Hugging Face folder."""


def _tasks(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from lmlab.eval.multiple_choice import read_task, score_task, total_requests
    from lmlab.eval.score import CONFIDENCE
    from lmlab.fileio import atomic_write_json, atomic_write_text
    from lmlab.runs.device import select_device
    from lmlab.runs.load import load_model

    for flag in ("out", "records_out"):
        path = getattr(args, flag)
        if path is not None and Path(path).is_dir():
            raise UserError(f"--{flag.replace('_', '-')} {path} is a folder: name a file")
    if len(args.task) > 1 and args.records_out is not None:
        raise UserError("--records-out takes one --task at a time")
    tasks = {name: read_task(name, args.limit) for name in args.task}  # all checked first
    loaded = load_model(args.checkpoint, select_device(args.device), quantize=args.quantize)
    reports = []
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
        for name, examples in tasks.items():
            bar = progress.add_task(f"scoring {name}", total=total_requests(examples))
            reports.append(
                score_task(
                    loaded,
                    examples,
                    task=name,
                    batch_size=args.batch_size or 16,
                    bootstrap=args.bootstrap,
                    seed=args.bootstrap_seed,
                    on_progress=lambda done, bar=bar: progress.update(bar, completed=done),
                )
            )
    result = {"model": str(loaded.path), "tasks": [r.to_json() for r in reports]}
    if args.out is not None:
        atomic_write_json(args.out, result)
    if args.records_out is not None:
        atomic_write_text(
            args.records_out, "".join(json.dumps(r) + "\n" for r in reports[0].records)
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title=f"{loaded.path}")
    for column in ("task", "examples", "accuracy", f"{CONFIDENCE:.0%} CI", "acc_norm", "CI"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for report in reports:
        cells = []
        for metric in ("accuracy", "acc_norm"):
            score = report.aggregates[metric]
            interval = (
                f"[{score.ci_low:.4f}, {score.ci_high:.4f}]" if score.ci_low is not None else "-"
            )
            cells += [f"{score.value:.4f}", interval]
        table.add_row(report.task, str(len(report.records)), *cells)
    Console().print(table)
    for report in reports:
        if report.truncated:
            print(
                f"{report.task}: {report.truncated} context+choice pairs were longer than the "
                "model's context; their oldest tokens were dropped"
            )
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab eval",
        description="Evaluate a checkpoint: loss, perplexity and bits per byte on a data split, "
        "or accuracy on multiple-choice tasks (--task).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("checkpoint", metavar="RUN_DIR|CKPT|HF_DIR")
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
    add_quantize_argument(parser)
    tasks = parser.add_argument_group("multiple-choice tasks")
    tasks.add_argument(
        "--task", action="append", default=[], metavar="FILE.jsonl", help="repeatable"
    )
    tasks.add_argument("--limit", type=int, default=None, help="only the first N examples")
    tasks.add_argument("--bootstrap", type=int, default=1000, help="resamples (0: no intervals)")
    tasks.add_argument("--bootstrap-seed", type=int, default=0)
    tasks.add_argument("--out", default=None, metavar="FILE.json", help="also write the result")
    tasks.add_argument(
        "--records-out", default=None, metavar="FILE.jsonl", help="per-example log-likelihoods"
    )
    args = parser.parse_args(argv)
    if args.batches < 0 or (args.batch_size is not None and args.batch_size <= 0):
        raise UserError("--batches must be >= 0 and --batch-size positive")
    if args.task:
        return _tasks(args)
    with torch.inference_mode():
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            split=args.split,
            batches=args.batches,
            batch_size=args.batch_size,
            device=args.device,
            quantize=args.quantize,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        bpb = result.get("val_bits_per_byte")
        print(
            f"{result['checkpoint']}{' (int8)' if args.quantize else ''} on {result['data']} "
            f"({args.split}, {result['val_tokens']:,} tokens): "
            f"loss {result['val_loss']:.4f} | perplexity {result['val_perplexity']:.2f}"
            + (f" | bits/byte {bpb:.4f}" if bpb is not None else "")
        )
    return 0
