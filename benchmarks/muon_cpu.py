"""Does Muon help at the CPU teaching scale? AdamW vs Muon on char-level Shakespeare.

The `shakespeare-char-fast` recipe (LLaMA 4x128, context 64, batch 12) trained with
`train.optimizer=adamw` and `train.optimizer=muon` for the same steps, on the shipped
Shakespeare sample with the classic tail split (last 10% validates); Muon at the recipe's
learning rate and at a few multiples (its update is scaled to AdamW's RMS, so the same lr
is a fair start, not necessarily its best). The losses do not depend on the machine's load;
the tokens/s do (the runs go one after another), so compare them only on a quiet machine.
Reports each run's val loss curve, its final and best val loss, and its training tokens/s
(evaluation excluded).

Prints one JSON object.  python benchmarks/muon_cpu.py [--steps 1100] [--muon-lr-scales 1,2]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # see benchmarks/cpu_reference.py

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from lmlab.config import build_config
from lmlab.data.prepare import prepare
from lmlab.runs.provenance import source_commit
from lmlab.train.loop import train


def run(data: Path, runs: Path, steps: int, optimizer: str, lr_scale: float) -> dict:
    base = build_config("shakespeare-char-fast").train.lr
    cfg = build_config(
        "shakespeare-char-fast",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            f"logging.name={optimizer}-{lr_scale:g}",
            "logging.tensorboard=false",
            "train.device=cpu",
            f"train.max_steps={steps}",
            f"train.optimizer={optimizer}",
            f"train.lr={base * lr_scale}",
        ],
    )
    result = train(cfg, log=lambda *a, **k: None)
    trained = [r for r in result.history if "loss" in r]
    evals = [(r["step"], round(r["val_loss"], 4)) for r in result.history if "val_loss" in r]
    return {
        "optimizer": optimizer,
        "lr": cfg.train.lr,
        "final_val_loss": evals[-1][1],
        "best_val_loss": min(v for _, v in evals),
        "val_curve": evals,
        "train_tokens_per_s": sum(r["tokens_per_s"] for r in trained) / len(trained),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--muon-lr-scales", default="1,2")
    args = parser.parse_args()
    scales = [float(s) for s in args.muon_lr_scales.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        prepare(
            ["sample:shakespeare"],
            data,
            "char",
            doc_unit="file",
            val_split="tail",
            log=lambda *_: None,
        )
        results = [run(data, tmp / "runs", args.steps, "adamw", 1.0)]
        for scale in scales:
            results.append(run(data, tmp / "runs", args.steps, "muon", scale))
    adamw = results[0]
    print(
        json.dumps(
            {
                "benchmark": "muon_cpu",
                "commit": source_commit(),
                "machine": platform.machine(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "steps": args.steps,
                "runs": results,
                "muon_best_minus_adamw_best": min(r["best_val_loss"] for r in results[1:])
                - adamw["best_val_loss"],
                "muon_tokens_per_s_over_adamw": results[1]["train_tokens_per_s"]
                / adamw["train_tokens_per_s"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
