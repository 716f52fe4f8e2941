"""Training tokens/s of the CPU preset ladder on this machine (`lmlab bench` for each).

Each preset (ultra-tiny, tiny, small, base, medium; vocab 512, context 256, the presets'
micro-batch of 16) is timed for `--steps` training steps on random tokens, in rounds that
visit every preset in turn, so a busy machine slows all of them alike; the median of the
rounds is reported. fp32, torch's default threads.

Prints one JSON object.  python benchmarks/cpu_presets.py [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # see benchmarks/cpu_reference.py

import argparse
import json
import platform
import statistics

import torch

from lmlab.model.build import param_count
from lmlab.model.presets import MODEL_PRESETS
from lmlab.runs.provenance import source_commit
from lmlab.train.bench import bench

PRESETS = ["ultra-tiny", "tiny", "small", "base", "medium"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    measured: dict[str, list[float]] = {p: [] for p in PRESETS}
    for _ in range(args.rounds):
        for preset in PRESETS:
            result = bench(
                preset,
                seq_len=None,
                micro_batch=None,
                compile=False,
                steps=args.steps,
                warmup=2,
                device="cpu",
            )
            measured[preset].append(result["tokens_per_s"])
    print(
        json.dumps(
            {
                "benchmark": "cpu_presets",
                "commit": source_commit(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "steps": args.steps,
                "rounds": args.rounds,
                "presets": {
                    p: {
                        "params": param_count(MODEL_PRESETS[p]),
                        "tokens_per_s_median": round(statistics.median(v)),
                        "tokens_per_s": [round(x) for x in v],
                    }
                    for p, v in measured.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
