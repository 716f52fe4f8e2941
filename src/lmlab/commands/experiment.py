"""`lmlab experiment`: run a teaching experiment that ends in plots and a README."""

from __future__ import annotations

import argparse
import sys

from lmlab.errors import UserError
from lmlab.experiments.common import EXPERIMENTS, experiment_options, run_experiment


def _parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"expected KEY=VALUE, got {item!r} (e.g. steps=300)")
        overrides[key] = value
    return overrides


def _listing(names: list[str]) -> str:
    """Each experiment's lesson, then its options (KEY: what it sets, and its defaults)."""
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise UserError(f"unknown experiment {unknown[0]!r}; choose from: {', '.join(EXPERIMENTS)}")
    lines = []
    for name in names or EXPERIMENTS:
        lines.append(f"{name.ljust(14)} {EXPERIMENTS[name][1]}")
        options = experiment_options(name)
        width = max((len(key) for key in options), default=0) + 1
        lines += [f"    {(key + '=').ljust(width)}  {text}" for key, text in options.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    names = "\n".join(f"  {name.ljust(14)} {text}" for name, (_, text) in EXPERIMENTS.items())
    parser = argparse.ArgumentParser(
        prog="lmlab experiment",
        description="Run a teaching experiment on the CPU. It ends in a folder with "
        "results.json, PNG plots and a README.md that explains the lesson with the numbers "
        "this run measured.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""experiments:
{names}

examples:
  lmlab experiment list                         # every experiment with its options
  lmlab experiment list copy-task               # one experiment's options and defaults
  lmlab experiment overfit --quick              # about a minute: the lesson in small
  lmlab experiment overfit                      # the full run (minutes); experiments/overfit/
  lmlab experiment overfit --out /tmp/of steps=300 preset=tiny

In Python: lmlab.run_experiment("overfit", quick=True, steps=300) returns the same results.""",
    )
    parser.add_argument("name", help="an experiment (see below), or `list`")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="experiment options")
    parser.add_argument("--out", help="results folder (default experiments/NAME[-quick])")
    parser.add_argument(
        "--quick", action="store_true", help="a small version: a few minutes at most, for CI"
    )
    args = parser.parse_intermixed_args(argv)
    if args.name == "list":
        print(_listing(args.overrides))
        return 0
    result = run_experiment(
        args.name,
        args.out,
        quick=args.quick,
        log=print,
        live=sys.stdout.isatty(),
        **_parse_overrides(args.overrides),
    )
    print(f"done in {result.seconds:.0f} s: {result.readme} ({len(result.plots)} plots)")
    return 0
