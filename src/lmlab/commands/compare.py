"""`lmlab compare`: two models on one task (predict and score both); before/after a fine-tune."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.commands.predict import add_generation_arguments, predict_options

EPILOG = """examples:
  lmlab compare runs/quickstart/20261124-101500 runs/finetune/20261124-111500 --task dsl:flowroll:200
  lmlab compare Qwen/Qwen2.5-0.5B runs/faq-lora/20261124-101500 --task faq.jsonl --stop "\\n\\n"
  lmlab compare exported/base exported/tuned --task faq.jsonl --markdown > comparison.md
  lmlab compare A B --task faq.jsonl --json --save-predictions compare-out

Both models get the same records and generation options (greedy by default) and are
scored with the same bootstrap seed, so the interval of B - A is a paired bootstrap.
The task is a JSONL file of {"prompt", "reference"} or {"messages"} records, or dsl:NAME[:N]
(as for `lmlab predict`); the metrics are those of `lmlab score`."""


def _print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmlab.eval.score import CONFIDENCE, metric_scale

    console = Console()
    a, b = report.names
    table = Table(title=f"{len(report.a.records)} records: A = {a}, B = {b}")
    table.add_column("metric")
    for column in ("A", "B", "B - A", f"{CONFIDENCE:.0%} CI of B - A"):
        table.add_column(column, justify="right")
    for name in report.a.metrics:
        digits = 2 if metric_scale(name) == "0-100" else 4
        diff = report.differences[name]
        ci = (
            f"[{diff.ci_low:+.{digits}f}, {diff.ci_high:+.{digits}f}]"
            if diff.ci_low is not None
            else "-"
        )
        table.add_row(
            name,
            f"{report.a.aggregates[name].value:.{digits}f}",
            f"{report.b.aggregates[name].value:.{digits}f}",
            f"{diff.value:+.{digits}f}",
            ci,
        )
    console.print(table)
    if report.disagreements:
        console.print(f"examples where {report.primary} differs:", highlight=False)
    for example in report.disagreements:
        console.print(
            f"  record {example['index'] + 1}: {example['prompt']!r} (reference {example['reference']!r})\n"
            f"    A {example['score_a']:.2f}: {example['a']!r}\n"
            f"    B {example['score_b']:.2f}: {example['b']!r}",
            highlight=False,
            markup=False,
        )


def main(argv: list[str]) -> int:
    """Run `lmlab compare ARGV...`; bad input raises UserError."""
    parser = argparse.ArgumentParser(
        prog="lmlab compare",
        description="Predict and score a task with two models (lmlab runs, LoRA runs or "
        "Hugging Face folders) and show the differences with paired 95% intervals.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("model_a", metavar="A", help="the baseline: run, checkpoint or HF folder")
    parser.add_argument("model_b", metavar="B", help="the model compared with it")
    parser.add_argument("--task", "-t", required=True, metavar="FILE.jsonl|dsl:NAME[:N]")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--metrics", default=None, help="comma-separated (default: all that apply)")
    parser.add_argument("--reference-field", default=None, help="field holding the reference")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (0: no intervals)")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=3, help="disagreeing records shown (3)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--save-predictions",
        metavar="DIR",
        default=None,
        help="also write a.jsonl, b.jsonl and compare.json to DIR (new or empty)",
    )
    add_generation_arguments(parser)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from lmlab.errors import UserError
    from lmlab.eval.compare import compare_models, to_markdown
    from lmlab.fileio import atomic_directory, atomic_write_json
    from lmlab.generate.predict import read_inputs, write_predictions
    from lmlab.runs.device import select_device

    save = Path(args.save_predictions) if args.save_predictions else None
    if save is not None and save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise UserError(f"--save-predictions {save} exists and is not an empty folder")
    options = predict_options(args)
    records = read_inputs(args.task, args.limit)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Progress goes to stderr so that --json / --markdown output can be redirected whole.
    with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
        tasks = [progress.add_task(f"predicting with {x}", total=len(records)) for x in "AB"]
        report, preds_a, preds_b = compare_models(
            args.model_a,
            args.model_b,
            records,
            options,
            device=select_device(args.device),
            metrics=args.metrics,
            reference_field=args.reference_field,
            bootstrap=args.bootstrap,
            seed=args.bootstrap_seed,
            examples=args.examples,
            on_progress=lambda which, done: progress.update(tasks[which], completed=done),
        )
    if save is not None:
        with atomic_directory(save, overwrite=save.exists()) as tmp:
            write_predictions(tmp / "a.jsonl", preds_a)
            write_predictions(tmp / "b.jsonl", preds_b)
            atomic_write_json(tmp / "compare.json", report.to_json())
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    elif args.markdown:
        print(to_markdown(report), end="")
    else:
        _print_table(report)
    return 0
