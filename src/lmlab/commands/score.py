"""`lmlab score`: text metrics over a predictions file, with bootstrap confidence intervals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """examples:
  lmlab score --predictions preds.jsonl
  lmlab score --predictions preds.jsonl --metrics exact_match,token_f1,rougeL --json
  lmlab score --predictions preds.jsonl --out scores.json --records-out per_record.jsonl
  lmlab score --predictions preds.jsonl --reference-field answer --bootstrap 0

Records are what `lmlab predict` writes: the input's fields plus "prediction". The
reference is the first present of "reference", "completion", "answer", "target",
"output", or a final assistant message; a list of strings means several references.
Everything is 0-1 except bleu and chrf (sacrebleu corpus scores, 0-100). Practice-language
records (`--input dsl:NAME`) also get execution_accuracy and valid_fraction, scored by
the language's interpreter as `lmlab dsl eval` does."""


def _check_output(path: str | None, flag: str) -> None:
    from lmlab.errors import UserError

    if path is not None and Path(path).is_dir():
        raise UserError(f"{flag} {path} is a folder: name a file")


def _print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmlab.eval.score import CONFIDENCE, metric_scale

    title = f"{report.source or 'predictions'}: {len(report.records)} records"
    table = Table(title=title)
    table.add_column("metric")
    for column in ("value", f"{CONFIDENCE:.0%} CI", "n"):
        table.add_column(column, justify="right")
    for name, score in report.aggregates.items():
        # 0-100 scores read best with two decimals, 0-1 scores with four.
        digits = 2 if metric_scale(name) == "0-100" else 4
        interval = (
            f"[{score.ci_low:.{digits}f}, {score.ci_high:.{digits}f}]"
            if score.ci_low is not None
            else "-"
        )
        table.add_row(name, f"{score.value:.{digits}f}", interval, str(score.n))
    Console().print(table)


def main(argv: list[str]) -> int:
    """Run `lmlab score ARGV...`; bad input raises UserError."""
    from lmlab.eval.score import METRICS

    parser = argparse.ArgumentParser(
        prog="lmlab score",
        description="Score a predictions file with exact match, F1, Jaccard, ROUGE, BLEU, chrF "
        "and (for practice languages) execution accuracy, each with a bootstrap 95% interval.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--predictions", "-p", required=True, metavar="PREDS.jsonl")
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="A,B,...",
        help=f"comma-separated, from: {', '.join(METRICS)} (default: all that apply)",
    )
    parser.add_argument(
        "--prediction-field", default="prediction", help="field holding the prediction"
    )
    parser.add_argument(
        "--reference-field", default=None, help="field holding the reference (default: auto)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="resamples for the interval (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the aggregates as JSON")
    parser.add_argument("--out", metavar="FILE.json", help="write the aggregate JSON here")
    parser.add_argument(
        "--records-out", metavar="FILE.jsonl", help="write each record's scores here"
    )
    args = parser.parse_args(argv)

    from lmlab.errors import UserError
    from lmlab.eval.score import (
        read_predictions,
        score_records,
        write_record_scores,
        write_report,
    )

    _check_output(args.out, "--out")
    _check_output(args.records_out, "--records-out")
    if (
        args.out
        and args.records_out
        and Path(args.out).resolve() == Path(args.records_out).resolve()
    ):
        raise UserError("--out and --records-out name the same file")
    report = score_records(
        read_predictions(args.predictions),
        metrics=args.metrics,
        reference_field=args.reference_field,
        prediction_field=args.prediction_field,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_table(report)
    if args.out:
        write_report(report, args.out)
    if args.records_out:
        write_record_scores(report, args.records_out)
    return 0
