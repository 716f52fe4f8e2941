"""`lmlab quickstart`: teach a small LLaMA the FLOWROLL language on a CPU, in minutes."""

from __future__ import annotations

import argparse

from lmlab.experiments.quickstart import run_quickstart


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab quickstart",
        description="Teach a small LLaMA the FLOWROLL practice language on a CPU: data, tokenizer, training, scoring.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmlab quickstart\n  lmlab quickstart --out /tmp/qs --steps 200",
    )
    parser.add_argument(
        "--out", default="quickstart", help="folder for data and runs (default ./quickstart)"
    )
    parser.add_argument(
        "--programs", type=int, default=30_000, help="training programs to generate (default 30000)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the quickstart recipe's)"
    )
    parser.add_argument(
        "--test-programs", type=int, default=200, help="held-out programs to score (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_quickstart(
        args.out,
        programs=args.programs,
        steps=args.steps,
        test_programs=args.test_programs,
        seed=args.seed,
        log=lambda m: print(m, flush=True),
    )
    return 0
