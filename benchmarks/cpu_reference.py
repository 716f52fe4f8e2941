"""The classic laptop recipe for GPT training, run through lmlab, and lmlab's fast recipe.

Data: char-level tinyshakespeare (../shared/data), prepared by `lmlab prepare --tokenizer
char` (paragraphs as documents, 10% held out).

1. `reference`: exactly the widely used CPU demo shape (GPT, 4 layers, 4 heads, width 128,
   context 64, batch 12, no dropout, lr 1e-3, 2000 steps). Reports training tokens/s
   (evaluation excluded) and the final val loss. Target: >= 12,000 tokens/s.
2. `fast`: the `shakespeare-char-fast` preset. Reports the wall-clock seconds from the
   start of `train()` until an evaluation first reports val loss <= 1.88 (evaluation time
   included). Target: <= 105 s.

Prints one JSON object.  python benchmarks/cpu_reference.py [--only reference|fast]
"""

from __future__ import annotations

import os

# OpenMP threads spin-wait for work by default; if anything else runs on a 2-core machine,
# spinning threads starve each other and training slows down many times over. Must be set
# before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from lmlab.config import build_config
from lmlab.data.prepare import prepare
from lmlab.model.build import param_count
from lmlab.runs.provenance import source_commit
from lmlab.train.loop import train

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET_LOSS = 1.88


def run(preset: str, data: Path, runs: Path, *overrides: str) -> dict:
    cfg = build_config(
        preset,
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "logging.tensorboard=false",
            "train.device=cpu",
            *overrides,
        ],
    )
    result = train(cfg, log=lambda *a, **k: None)
    steps = [r for r in result.history if "loss" in r]
    evals = [r for r in result.history if "val_loss" in r]
    train_s = sum(
        r["step_time_s"] * (r["step"] - prev["step"])
        for prev, r in zip([{"step": 0}, *steps], steps, strict=False)
    )
    tokens = steps[-1]["tokens_seen"]
    reached = next((r for r in evals if r["val_loss"] <= TARGET_LOSS), None)
    return {
        "preset": preset,
        "params": param_count(result.config.model),
        "steps": cfg.train.max_steps,
        "tokens_per_step": cfg.train.micro_batch_size * cfg.seq_len,
        "train_tokens_per_s": tokens / train_s,
        "train_s": train_s,
        "wall_s": result.history[-1]["elapsed_s"],
        "final_val_loss": evals[-1]["val_loss"],
        "seconds_to_val_loss_1_88": reached["elapsed_s"] if reached else None,
        "step_reaching_1_88": reached["step"] if reached else None,
        "evals": [(r["step"], round(r["val_loss"], 4), round(r["elapsed_s"], 1)) for r in evals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("reference", "fast"), default=None)
    parser.add_argument("--text", type=Path, default=TEXT)
    args = parser.parse_args()
    out: dict = {
        "benchmark": "cpu_reference",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    out["commit"] = source_commit()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(args.text)], data, "char", log=lambda *_: None)
        if args.only in (None, "reference"):
            out["reference"] = run("shakespeare-char-reference", data, Path(tmp) / "runs")
            out["reference"]["target_tokens_per_s"] = 12_000
        if args.only in (None, "fast"):
            out["fast"] = run("shakespeare-char-fast", data, Path(tmp) / "runs")
            out["fast"]["target_seconds"] = 105
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
