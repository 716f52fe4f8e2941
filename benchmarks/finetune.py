"""Full fine-tuning vs LoRA on CPU: step time and peak memory of the trainer's own step.

Runs `lmlab bench --method full|lora` (the trainer's set-up and step on random tokens, each
in a fresh process so peak RSS is its own) in interleaved rounds, and prints one JSON
object with the medians and the LoRA / full ratios. glibc's mmap threshold is fixed at
64 KiB so freed tensors go back to the OS and RSS follows live memory. Memory is reported
twice: the peak (which for QLoRA includes the fp32 base it is quantized from at set-up)
and the resident set after the timed steps (training's steady state).

  python benchmarks/finetune.py [--preset medium --seq-len 256 --micro-batch 8 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from lmlab.runs.provenance import source_commit

METHODS = ("full", "lora", "qlora")


def bench(preset: str, seq_len: int, micro_batch: int, steps: int, method: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [
        *("--preset", preset, "--seq-len", str(seq_len), "--micro-batch", str(micro_batch)),
        *("--steps", str(steps), "--warmup", "2", "--device", "cpu", "--method", method),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "lmlab", "bench", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"lmlab bench {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:  # interleaved, so a busy spell hurts both alike
            runs[method].append(
                bench(args.preset, args.seq_len, args.micro_batch, args.steps, method)
            )
    summary = {}
    for method, results in runs.items():
        summary[method] = {
            "trainable_params": results[0]["trainable_params"],
            "params": results[0]["params"],
            "step_time_s": statistics.median(r["step_time_s"] for r in results),
            "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in results),
            "step_time_s_each": [r["step_time_s"] for r in results],
            "peak_memory_bytes_each": [r["peak_memory_bytes"] for r in results],
            "memory_after_steps_bytes": statistics.median(
                r["memory_after_steps_bytes"] for r in results
            ),
        }
    full, lora = summary["full"], summary["lora"]
    print(
        json.dumps(
            {
                "benchmark": "finetune full vs lora (lmlab bench --method)",
                "commit": source_commit(),
                "device": runs["full"][0]["device"],
                "preset": args.preset,
                "seq_len": args.seq_len,
                "micro_batch": args.micro_batch,
                "rounds": args.rounds,
                "methods": summary,
                "lora_speedup": full["step_time_s"] / lora["step_time_s"],
                "lora_memory_fraction": lora["peak_memory_bytes"] / full["peak_memory_bytes"],
                "qlora_speedup": full["step_time_s"] / summary["qlora"]["step_time_s"],
                "qlora_memory_after_steps_fraction": summary["qlora"]["memory_after_steps_bytes"]
                / full["memory_after_steps_bytes"],
                "lora_memory_after_steps_fraction": lora["memory_after_steps_bytes"]
                / full["memory_after_steps_bytes"],
                "targets": {"lora_speedup": ">= 1.3", "lora_memory_fraction": "<= 0.60"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
