"""`lmlab quickstart`: teach a small LLaMA the FLOWROLL language on a CPU, in minutes;
with --finetune, the fine-tuning workshop (a Shakespeare base, LoRA vs full fine-tuning)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab quickstart",
        description="Teach a small LLaMA the FLOWROLL practice language on a CPU: data, tokenizer, "
        "training, scoring. With --finetune: train a base on Shakespeare, then fine-tune it on "
        "FLOWROLL with LoRA and with every weight, and compare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmlab quickstart\n  lmlab quickstart --out /tmp/qs --steps 200\n"
        "  lmlab quickstart --finetune\n  lmlab quickstart --finetune --steps 150 --base-steps 300",
    )
    parser.add_argument("--finetune", action="store_true", help="the fine-tuning workshop")
    parser.add_argument(
        "--out", default=None, help="folder for data and runs (default ./quickstart or ./workshop)"
    )
    parser.add_argument(
        "--programs",
        type=int,
        default=None,
        help="training programs (default 30000; 8000 with --finetune)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training (fine-tuning) steps (default: the recipe's)",
    )
    parser.add_argument(
        "--base-steps", type=int, default=600, help="with --finetune: base model steps (600)"
    )
    parser.add_argument(
        "--test-programs", type=int, default=None, help="held-out programs to score (200; 100)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("programs", "steps", "base_steps", "test_programs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file: name a folder for the data and runs")
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.finetune:
        from lmlab.experiments.workshop import run_workshop

        run_workshop(
            args.out or "workshop",
            base_steps=args.base_steps,
            finetune_steps=args.steps or 800,
            programs=args.programs or 8000,
            test_programs=args.test_programs or 100,
            seed=args.seed,
            log=log,
        )
        return 0
    from lmlab.experiments.quickstart import run_quickstart

    run_quickstart(
        args.out or "quickstart",
        programs=args.programs or 30_000,
        steps=args.steps,
        test_programs=args.test_programs or 200,
        seed=args.seed,
        log=log,
    )
    return 0
