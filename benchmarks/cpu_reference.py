"""The classic laptop recipe for GPT training, run through lmlab, beside lmlab's own recipes.

Data: char-level tinyshakespeare (../shared/data), prepared by `lmlab prepare --tokenizer
char --val-split tail`: the last 10% of the text is the validation split, as in the widely
used reference implementation, whose 2,000-step run ends at val loss 1.886 there.

Runs, one after another in this order, each in a fresh process, the whole order repeated
--rounds times (interleaved, so that a machine other programs slow down slows each alike):

1. `reference`: exactly the reference's CPU demo shape (GPT, 4 layers, 4 heads, width 128,
   context 64, batch 12, no dropout, lr 1e-3, 2000 steps, 20 eval batches every 250 steps).
   Wall clock for the 2000 steps with their evaluations (target <= 75 s: 1.5x the
   reference's ~113 s) and training tokens/s (evaluation excluded).
2. `fast`: the `shakespeare-char-fast` recipe (LLaMA 4x128, 1100 steps).
3. `compile_cold` / `compile_warm`: `fast` with `train.compile=true`, first with an empty
   torch.compile cache, then again with the cache the first run left. Wall clock includes
   the compilation (it happens in the first steps).
4. `speedrun`: the `shakespeare-char-speedrun` recipe. Target: val loss <= 1.886 within 28 s
   of wall clock (4x faster than the reference).

For each run: `seconds_to_1_886`, the wall clock from the start of `train()` to the first
evaluation at or below the reference's final 1.886 (evaluations included), and
`full_val_loss`, the final weights' loss on the whole validation split (the evaluations
during training read its first eval.batches x 12 x 64 tokens).

Prints one JSON object: every round's figures and their medians.
    python benchmarks/cpu_reference.py [--rounds 2] [--only reference,fast,compile,speedrun]
"""

from __future__ import annotations

import os

# OpenMP threads spin-wait for work by default; if anything else runs on a 2-core machine,
# spinning threads starve each other and training slows down many times over. Must be set
# before torch loads libgomp (the child processes inherit it).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET_LOSS = 1.886  # the reference's final val loss on this split
RUNS = ("reference", "fast", "compile", "speedrun")


def child(preset: str, data: Path, runs: Path, overrides: list[str]) -> dict:
    """Train `preset` in this process; the measured figures."""
    import torch

    from lmlab.config import build_config
    from lmlab.eval.metrics import evaluate_checkpoint
    from lmlab.model.build import param_count
    from lmlab.train.loop import train

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
    started = time.perf_counter()
    result = train(cfg, log=lambda *a, **k: None)
    wall = time.perf_counter() - started
    steps = [r for r in result.history if "loss" in r]
    evals = [r for r in result.history if "val_loss" in r]
    train_s = sum(
        r["step_time_s"] * (r["step"] - prev["step"])
        for prev, r in zip([{"step": 0}, *steps], steps, strict=False)
    )
    reached = next((r for r in evals if r["val_loss"] <= TARGET_LOSS), None)
    full = evaluate_checkpoint(result.run_dir, batches=0, device="cpu")
    return {
        "preset": preset,
        "overrides": overrides,
        "params": param_count(result.config.model),
        "steps": cfg.train.max_steps,
        "tokens_per_step": cfg.train.micro_batch_size * cfg.seq_len,
        "threads": torch.get_num_threads(),
        "train_tokens_per_s": steps[-1]["tokens_seen"] / train_s,
        "train_s": train_s,
        "wall_s": wall,
        "final_val_loss": evals[-1]["val_loss"],
        "full_val_loss": full["val_loss"],
        "seconds_to_1_886": reached["elapsed_s"] if reached else None,
        "step_reaching_1_886": reached["step"] if reached else None,
        "evals": [(r["step"], round(r["val_loss"], 4), round(r["elapsed_s"], 1)) for r in evals],
    }


def spawn(preset: str, data: Path, runs: Path, *overrides: str, env: dict | None = None) -> dict:
    """`child` in a fresh Python process (nothing compiled or cached in memory carries over)."""
    spec = json.dumps(
        {"preset": preset, "data": str(data), "runs": str(runs), "overrides": overrides}
    )
    out = subprocess.run(
        [sys.executable, __file__, "--child", spec],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default=",".join(RUNS), help="comma-separated: " + ", ".join(RUNS)
    )
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument(
        "--rounds", type=int, default=2, help="times to run each, interleaved (default 2)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(
            json.dumps(
                child(spec["preset"], Path(spec["data"]), Path(spec["runs"]), spec["overrides"])
            )
        )
        return

    import torch

    from lmlab.data.prepare import prepare
    from lmlab.runs.provenance import source_commit

    only = set(args.only.split(","))
    if only - set(RUNS):
        parser.error(f"--only takes {', '.join(RUNS)}")
    out: dict = {
        "benchmark": "cpu_reference",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "commit": source_commit(),
        "val_split": "tail (last 10% of the text)",
        "target_loss": TARGET_LOSS,
    }
    summary_keys = ("wall_s", "train_tokens_per_s", "seconds_to_1_886", "full_val_loss")
    out["rounds"] = []
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "runs"
        prepare([str(args.text)], data, "char", val_split="tail", log=lambda *_: None)
        cache = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "compile-cache")}  # empty at first
        for round_index in range(args.rounds):
            results: dict = {}
            if "reference" in only:
                results["reference"] = spawn("shakespeare-char-reference", data, runs)
            if "fast" in only:
                results["fast"] = spawn("shakespeare-char-fast", data, runs)
            if "compile" in only:
                # Cold once (the first round finds the cache empty), warm in every round.
                names = ("compile_cold", "compile_warm") if round_index == 0 else ("compile_warm",)
                for name in names:
                    results[name] = spawn(
                        "shakespeare-char-fast", data, runs, "train.compile=true", env=cache
                    )
            if "speedrun" in only:
                results["speedrun"] = spawn("shakespeare-char-speedrun", data, runs)
            out["rounds"].append(results)
    # Medians over the rounds of each run's headline figures (a single cold compile).
    out["median"] = {
        name: {
            key: statistics.median(r[name][key] for r in out["rounds"] if name in r)
            if all(r[name][key] is not None for r in out["rounds"] if name in r)
            else None
            for key in summary_keys
        }
        for name in out["rounds"][0]
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
