"""`lmlab bench`: training-step speed of a preset on this machine, as JSON (lmlab.train.bench)."""

from __future__ import annotations

import argparse
import json

from lmlab.config import ACTIVATION_CHECKPOINTING, PRECISIONS, STRATEGIES
from lmlab.train.bench import bench


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab bench",
        description="Time training steps of a preset on random tokens; print tokens/s, step time, MFU and peak memory as JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmlab bench --preset tiny --steps 10\n"
        "  lmlab bench --preset gpt2-124m --seq-len 1024 --micro-batch 16 --compile\n"
        "  lmlab bench --preset small --method lora finetune.lora_rank=16\n"
        "  lmlab bench --preset llama-1.36b --nproc 2 --strategy fsdp --activation-checkpointing full",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides"
    )
    parser.add_argument("--preset", "-p", required=True)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="sequences per step (default: the preset's)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument(
        "--strategy",
        default="ddp",
        choices=STRATEGIES,
        help="with several processes (default ddp)",
    )
    parser.add_argument(
        "--activation-checkpointing", default="none", choices=ACTIVATION_CHECKPOINTING
    )
    parser.add_argument(
        "--method",
        choices=("full", "lora", "qlora"),
        default="full",
        help="train every weight, or LoRA adapters on a frozen base, fp32 or 4-bit NF4 (qlora)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="K",
        help="run in K processes (starts torchrun); at most one per GPU, or per CPU core without GPUs",
    )
    parser.add_argument(
        "--force-nproc",
        action="store_true",
        help="allow --nproc above the number of GPUs (or CPU cores) found here",
    )
    args = parser.parse_args(argv)
    for name in ("seq_len", "micro_batch", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.nproc is not None and args.nproc != 1:  # launch() refuses K < 1
        from lmlab.train.distributed.launch import launch

        return launch("bench", args.nproc, argv, device=args.device, force=args.force_nproc)
    result = bench(
        args.preset,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        compile=args.compile,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        precision=args.precision,
        strategy=args.strategy,
        activation_checkpointing=args.activation_checkpointing,
        overrides=[*args.overrides, f"finetune.method={args.method}"],
    )
    if result is not None:  # rank 0 reports for the job
        print(json.dumps(result, indent=2))
    return 0
