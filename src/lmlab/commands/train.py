"""`lmlab train`: train a model on a prepared data directory, or resume a run."""

from __future__ import annotations

import argparse
import os
import sys

from lmlab.config import build_config, load_config, merge, parse_override
from lmlab.runs.folder import latest_run
from lmlab.runs.menu import interactive, resume_or_new

EPILOG = """examples:
  lmlab train --preset tiny --data data/flowroll
  lmlab train --preset tiny --data data/flowroll train.max_steps=500 model.n_layer=6
  lmlab train --config my_run.yaml --data data/notes train.lr=3e-4
  lmlab train --resume runs/tiny/20261123-101500
  lmlab train --resume latest train.max_steps=2000
  lmlab train --preset tiny --data data/flowroll --new     # never offer to resume
  lmlab train --nproc 4 --preset gpt2-124m --data data/web train.strategy=zero1
  torchrun --nproc_per_node=8 -m lmlab train --preset llama-1.36b --data data/web train.strategy=fsdp

Overrides are SECTION.KEY=VALUE for the sections model, data, train, eval, checkpoint and
logging; `lmlab config show --preset NAME` lists every key with its value.
In a terminal, when the newest run of the same name stopped before its end, lmlab offers
to resume it, start a new run, or delete it and start again. Ctrl-C stops at
the end of the current step and saves a checkpoint to resume from (with several processes,
all of them stop after the same step).
Strategies and multi-node launching: docs/distributed.md."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab train",
        description="Train a GPT-2 or LLaMA model on token shards written by `lmlab prepare`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides"
    )
    parser.add_argument(
        "--preset", "-p", default=None, help="model or recipe preset (see `lmlab config show`)"
    )
    parser.add_argument(
        "--config", "-c", default=None, metavar="FILE", help="YAML file of config sections"
    )
    parser.add_argument(
        "--data",
        "-d",
        default=None,
        metavar="DATA_DIR",
        help="prepared data (same as data.path=...)",
    )
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda, cuda:N or mps (same as train.device=...)"
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a run folder (from its newest checkpoint that verifies; a corrupt one is set aside), "
        "a checkpoint folder RUN/checkpoints/step_N (later ones are set aside), or 'latest' (the newest run "
        "with a checkpoint under ./runs, or under logging.runs_dir=DIR if given)",
    )
    parser.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        metavar="N",
        help="stop (with a checkpoint) after step N",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="K",
        help="train in K processes on this machine (starts torchrun; one per GPU, or gloo on CPU); "
        "at most one per GPU, or per CPU core without GPUs",
    )
    parser.add_argument(
        "--force-nproc",
        action="store_true",
        help="allow --nproc above the number of GPUs (or CPU cores) found here",
    )
    parser.add_argument(
        "--new",
        action="store_true",
        help="start a new run without offering to resume one of the same name",
    )
    args = parser.parse_args(argv)
    if args.stop_at_step is not None and args.stop_at_step < 1:
        parser.error(f"--stop-at-step must be a step >= 1, got {args.stop_at_step}")
    if args.resume and (args.preset or args.config):
        parser.error(
            "--resume continues a run with its saved config; --preset/--config cannot change it"
        )
    if not args.resume and not args.new and interactive():
        choice = resume_or_new(build_config(args.preset, args.config, _overrides(args)))
        if choice == "quit":
            return 1
        if choice is not None:  # resume it: the same command line, now with --resume
            from lmlab.train.distributed.launch import without_options

            argv = [*without_options(argv, PRESET_OPTIONS), "--resume", str(choice)]
            args = parser.parse_args(argv)
    if args.nproc is not None and args.nproc != 1:  # launch() refuses K < 1
        from lmlab.train.distributed.launch import launch

        device = next(
            (
                o.split("=", 1)[1]
                for o in reversed(_overrides(args))
                if o.startswith("train.device=")
            ),
            "auto",
        )
        return launch("train", args.nproc, argv, device=device, force=args.force_nproc)

    overrides = _overrides(args)

    from lmlab.train.loop import train  # torch is imported only when training

    if args.resume:
        if args.resume == "latest":  # under logging.runs_dir when it is given here
            runs_dir = next(
                (
                    o.split("=", 1)[1]
                    for o in reversed(overrides)
                    if o.startswith("logging.runs_dir=")
                ),
                "runs",
            )
            run_dir = latest_run(runs_dir)
        else:
            run_dir = args.resume
        cfg = load_config(f"{run_dir}/config.yaml")
        for text in overrides:
            cfg = merge(cfg, parse_override(text))
        result = train(
            cfg, resume=run_dir, stop_at_step=args.stop_at_step, log=_log, live=sys.stdout.isatty()
        )
    else:
        cfg = build_config(args.preset, args.config, overrides)
        result = train(cfg, stop_at_step=args.stop_at_step, log=_log, live=sys.stdout.isatty())
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        print(f"run folder: {result.run_dir}")
    if result.interrupted and args.stop_at_step is None:
        from lmlab.train.distributed.launch import launched

        return 0 if launched() else 130  # under --nproc the launcher gives the exit status
    return 0


PRESET_OPTIONS = ("--preset", "-p", "--config", "-c")


def _overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides, with --data and --device as the overrides they stand for."""
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    return overrides


def _log(message: str, end: str = "\n") -> None:
    print(message, end=end, flush=True)
