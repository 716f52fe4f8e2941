"""CPU training beside a busy program: tokens/s quiet and busy, before and after lmlab's
automatic CPU threads (issue 14, item 7). Prints JSON.

Each measurement is a fresh `lmlab bench` process (the thread choice is made at start-up).
"before" is torch's default (one thread per core; LMLAB_CPU_AUTO=0), "after" is lmlab's
default (train.cpu_threads=0: the cores other programs leave free). "busy" starts one
`while True: pass` process of its own first. The four cases are interleaved round by round,
so that a slower moment of a shared machine hits them all alike; medians are reported.

    python benchmarks/cpu_contention.py --rounds 3 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def bench(preset: str, steps: int, auto: bool, busy: bool) -> dict:
    env = {**os.environ, "LMLAB_CPU_AUTO": "1" if auto else "0"}
    env.pop("OMP_NUM_THREADS", None)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog is not None:
            time.sleep(0.5)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmlab",
                "bench",
                "--preset",
                preset,
                "--device",
                "cpu",
                "--steps",
                str(steps),
                "--warmup",
                "3",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out[out.index("{") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare-char-reference")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [(auto, busy) for auto in (False, True) for busy in (False, True)]
    runs: dict[str, list[float]] = {}
    threads: dict[str, int | None] = {}
    for _ in range(args.rounds):
        for auto, busy in cases:
            name = f"{'after' if auto else 'before'}_{'busy' if busy else 'quiet'}"
            result = bench(args.preset, args.steps, auto, busy)
            runs.setdefault(name, []).append(result["tokens_per_s"])
            threads[name] = result.get("cpu_threads")
    median = {name: statistics.median(values) for name, values in runs.items()}
    print(
        json.dumps(
            {
                "preset": args.preset,
                "steps": args.steps,
                "rounds": args.rounds,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "tokens_per_s": runs,
                "median_tokens_per_s": median,
                "threads": threads,
                "before_busy_over_quiet": median["before_busy"] / median["before_quiet"],
                "after_busy_over_quiet": median["after_busy"] / median["after_quiet"],
                "after_quiet_over_before_quiet": median["after_quiet"] / median["before_quiet"],
                "after_busy_over_before_quiet": median["after_busy"] / median["before_quiet"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
