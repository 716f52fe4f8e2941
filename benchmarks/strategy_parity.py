"""Two processes (gloo, CPU) under ddp / zero1 / fsdp against one process, same global batch.

For each model family, trains `ultra-tiny` for 20 steps in one process (micro-batch 4 x
4 accumulation) and in two torchrun processes per strategy (micro-batch 4 x 2 accumulation
x 2), on FLOWROLL data this script generates, and reports the largest per-step loss
difference and the largest final weight difference. Dropout is 0: its random masks are
drawn per rank. tests/train/test_distributed.py asserts the same agreement.

Prints one JSON object.  python benchmarks/strategy_parity.py
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from lmlab.config import build_config
from lmlab.data.prepare import prepare
from lmlab.runs.checkpoint import list_checkpoints
from lmlab.runs.provenance import source_commit
from lmlab.train.distributed.launch import torchrun_command
from lmlab.train.loop import train

SETTINGS = [
    "model.context_length=32",
    "model.dropout=0.0",
    "train.micro_batch_size=4",
    "train.tokens_per_step=512",
    "train.max_steps=20",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.device=cpu",
    "eval.interval=0",
    "eval.batches=2",
    "checkpoint.interval=0",
    "logging.interval=1",
    "logging.tensorboard=false",
]


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(run: Path):
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-parity-"))
    data = tmp / "data"
    prepare(["dsl:flowroll:3000"], data, "char", log=lambda *a: None)
    results = {}
    for family in ("llama", "gpt2"):
        common = [f"data.path={data}", f"model.family={family}", *SETTINGS]
        single = train(
            build_config("ultra-tiny", overrides=[*common, f"logging.runs_dir={tmp}/1-{family}"]),
            log=lambda *a, **k: None,
        ).run_dir
        for strategy in ("ddp", "zero1", "fsdp"):
            runs = tmp / f"2-{family}-{strategy}"
            subprocess.run(
                torchrun_command(
                    2,
                    [
                        *("train", "--preset", "ultra-tiny", *common),
                        f"logging.runs_dir={runs}",
                        f"train.strategy={strategy}",
                    ],
                ),
                check=True,
                capture_output=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            run = next(runs.glob("*/*/metrics.jsonl")).parent
            mine, ref = losses(run), losses(single)
            w_mine, w_ref = weights(run), weights(single)
            results[f"{family}/{strategy}"] = {
                "steps": len(mine),
                "final_loss_1proc": ref[-1],
                "final_loss_2proc": mine[-1],
                "max_abs_loss_diff": max(abs(a - b) for a, b in zip(mine, ref, strict=True)),
                "max_abs_weight_diff": max(
                    float((w_mine[k] - w_ref[k]).abs().max()) for k in w_ref
                ),
            }
    print(
        json.dumps(
            {"benchmark": "strategy_parity", "commit": source_commit(), "results": results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
