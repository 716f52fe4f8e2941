"""Peak memory per process of ddp / zero1 / fsdp in 2 processes, measured and planned.

Runs `lmlab bench --nproc 2 --strategy S` (the trainer's own set-up, gloo on CPU) for each
strategy, plus a one-process run, and sets the measured peak RSS beside the planner's
estimate (`lmlab.estimate.memory.training_memory`, fp32). Peak RSS also holds the Python
interpreter, torch's libraries and allocator slack, which the planner does not count, so
the comparison is of *differences*: what zero1 and fsdp save against ddp, measured vs.
planned. glibc's mmap threshold is fixed at 64 KiB so freed tensors go back to the OS and
RSS follows live memory.

Prints one JSON object.
  python benchmarks/strategy_memory.py [--preset gpt2-124m --seq-len 128 --micro-batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from lmlab.config import build_config
from lmlab.estimate.memory import training_memory
from lmlab.runs.provenance import source_commit


def bench(preset: str, seq_len: int, micro_batch: int, nproc: int, strategy: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "GOMP_SPINCOUNT": "1000"}
    args = [
        *("--preset", preset, "--seq-len", str(seq_len), "--micro-batch", str(micro_batch)),
        *("--steps", "2", "--warmup", "1", "--device", "cpu", "--strategy", strategy),
        *("--nproc", str(nproc)),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "lmlab", "bench", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    model_cfg = build_config(args.preset).model
    runs = {"single": bench(args.preset, args.seq_len, args.micro_batch, 1, "ddp")}
    for strategy in ("ddp", "zero1", "fsdp"):
        runs[strategy] = bench(args.preset, args.seq_len, args.micro_batch, 2, strategy)
    planned = {
        strategy: training_memory(
            model_cfg,
            args.micro_batch,
            args.seq_len,
            precision="fp32",
            strategy=strategy,
            world_size=2,
        ).total_bytes
        for strategy in ("ddp", "zero1", "fsdp")
    }
    measured = {name: run["peak_memory_bytes"] for name, run in runs.items()}
    mib = 2**20
    print(
        json.dumps(
            {
                "benchmark": "strategy_memory",
                "commit": source_commit(),
                "preset": args.preset,
                "params": runs["ddp"]["params"],
                "seq_len": args.seq_len,
                "micro_batch": args.micro_batch,
                "device": runs["ddp"]["device"],
                "measured_peak_rss_mib": {k: round(v / mib, 1) for k, v in measured.items()},
                "planned_mib": {k: round(v / mib, 1) for k, v in planned.items()},
                "saving_vs_ddp_mib": {
                    s: {
                        "measured": round((measured["ddp"] - measured[s]) / mib, 1),
                        "planned": round((planned["ddp"] - planned[s]) / mib, 1),
                    }
                    for s in ("zero1", "fsdp")
                },
                "step_time_s": {k: round(r["step_time_s"], 3) for k, r in runs.items()},
                "tokens_per_s": {k: round(r["tokens_per_s"]) for k, r in runs.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
