"""`lmlab dsl`: generate corpora of the practice languages and score model predictions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmlab.data.dsl.common import SPLITS
from lmlab.data.dsl.registry import LANGUAGES, evaluate, generate_corpus, get_language
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text

_GENERATE_EXAMPLE = """\
example:
  lmlab dsl generate --lang flowroll --n 20000 --seed 0 --difficulty 1-3 --out train.txt
  lmlab dsl generate --lang dimmatch --n 1000 --seed 0 --difficulty 2 --split test --out -

Each line reads `PROGRAM => RESULT`. The split depends only on a hash of the program, so
train, val and test never share a program, whatever the seed.
"""

_EVAL_EXAMPLE = """\
example:
  lmlab dsl eval --lang flowroll --predictions predictions.txt
  lmlab dsl eval --lang dimmatch --predictions predictions.txt --json

Each line of the predictions file reads `PROGRAM => PREDICTED_RESULT`, i.e. the prompt
`PROGRAM =>` followed by the model's completion.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab dsl",
        description="Generate and score the practice languages FLOWROLL and DIMMATCH.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,eval}")
    languages = "|".join(LANGUAGES)

    gen = commands.add_parser(
        "generate",
        help="write a corpus of `PROGRAM => RESULT` lines",
        description="Write N lines `PROGRAM => RESULT` of distinct programs from one split.",
        epilog=_GENERATE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Languages and difficulties are checked by the library, so that a bad value gives the
    # same one-line error here as from Python.
    gen.add_argument("--lang", required=True, help=f"practice language: {languages}")
    gen.add_argument("--n", type=int, required=True, help="number of lines (distinct programs)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    gen.add_argument(
        "--difficulty",
        required=True,
        help="level (number of operations), e.g. 2, or a range, e.g. 1-3",
    )
    gen.add_argument(
        "--split", choices=SPLITS, default="train", help="which split's programs (default: train)"
    )
    gen.add_argument("--out", required=True, help="output file, or - for stdout")

    ev = commands.add_parser(
        "eval",
        help="score `PROGRAM => PREDICTED_RESULT` lines against the reference interpreter",
        description="Report valid-program fraction and exact match, overall and per difficulty.",
        epilog=_EVAL_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--lang", required=True, help=f"practice language: {languages}")
    ev.add_argument("--predictions", required=True, help="predictions file, or - for stdin")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _generate(args: argparse.Namespace) -> int:
    lang = get_language(args.lang)
    if args.n <= 0:
        raise UserError(f"--n must be a positive number of lines, got {args.n}")
    if args.out != "-" and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder: name a file, or - for stdout")
    lines = generate_corpus(lang, args.n, args.seed, args.difficulty, args.split)
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
        print(f"wrote {len(lines)} {lang.name} {args.split} lines to {args.out}", file=sys.stderr)
    return 0


def _read_predictions(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"predictions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read predictions file {path}: {e}") from None


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['language']} predictions")
    for column in ("difficulty", "count", "valid", "exact match"):
        table.add_column(column, justify="right")
    rows = [*report["by_difficulty"].items(), ("all", report["overall"])]
    for level, score in rows:
        table.add_row(
            level,
            str(score["count"]),
            f"{score['valid_fraction']:.1%}",
            f"{score['exact_match']:.1%}",
        )
    Console().print(table)


def _eval(args: argparse.Namespace) -> int:
    lang = get_language(args.lang)
    report = evaluate(lang, _read_predictions(args.predictions))
    if report["overall"]["count"] == 0:
        raise UserError(f"no prediction lines in {args.predictions}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def main(argv: list[str]) -> int:
    """Run `lmlab dsl ARGV...`; bad input raises UserError."""
    args = _build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    return _eval(args)
