"""Dense vs. mixture of experts at equal active parameters, on char-level Shakespeare.

Two models trained by lmlab's own trainer on the same data (the shipped Shakespeare sample,
char-level, last 10% validates), with the same steps, batch, learning rate and schedule:

- dense: the `shakespeare-char-fast` recipe, LLaMA 4 x 128 with d_ff 384;
- moe: the same with every MLP replaced by 8 SwiGLU experts of d_ff 192, top-2 (so a token
  computes with 2 x 192 = 384 hidden units per layer, as in the dense model, plus the
  router's 8 x 128 weights), load-balancing loss at the default coefficient 0.01.

So the two have (about) equal active parameters and FLOPs per token; the MoE holds 4x the
MLP weights. Timing is interleaved: each run trains in chunks of `--chunk` steps, each
chunk in a fresh process that resumes the run (resume is bit-exact, so the losses are those
of one uninterrupted run), alternating dense/MoE and the order within each pair of chunks,
so a slow moment of the machine falls on both. Training tokens/s are the trainer's own
logged windows (evaluation excluded); peak memory is each model's largest process peak
RSS (the interpreter and torch's libraries included; `rss_before_training_bytes` is the
peak before the model is built).

Prints one JSON object.  python benchmarks/moe_vs_dense.py [--steps 800] [--chunk 200]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # see benchmarks/cpu_reference.py

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmlab.config import build_config
from lmlab.data.prepare import prepare
from lmlab.model.build import build_model
from lmlab.runs.provenance import source_commit
from lmlab.train.loop import train

RECIPE = "shakespeare-char-fast"
MODELS: dict[str, list[str]] = {
    "dense": [],
    "moe": [
        "model.family=moe",
        "model.d_ff=192",
        "model.n_expert=8",
        "model.n_expert_per_token=2",
    ],
}


def config(model: str, data: Path, runs: Path, steps: int, threads: int):
    return build_config(
        RECIPE,
        overrides=[
            *MODELS[model],
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            f"logging.name={model}",
            "logging.tensorboard=false",
            "train.device=cpu",
            f"train.cpu_threads={threads}",
            f"train.max_steps={steps}",
        ],
    )


def worker(args: argparse.Namespace) -> None:
    """One chunk of one run (in its own process): train or resume it up to --until."""
    torch.set_num_threads(args.threads)
    rss_before = _peak_rss_bytes()
    cfg = config(args.worker, args.data, args.runs, args.steps, args.threads)
    result = train(
        cfg,
        resume=args.resume,
        stop_at_step=args.until,
        log=lambda *a, **k: None,
    )
    model = build_model(result.config.model, "meta")
    active = model.num_active_params() if hasattr(model, "num_active_params") else None
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "step": result.state.step,
                "rss_before_training_bytes": rss_before,
                "peak_rss_bytes": _peak_rss_bytes(),
                "threads": torch.get_num_threads(),
                "total_params": model.num_params(),
                "active_params": active or model.num_params(),
                "flops_per_token": model.flops_per_token(result.config.seq_len),
            }
        )
    )


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _chunk(model: str, until: int, args, data: Path, runs: Path, resume: str | None) -> dict:
    command = [sys.executable, __file__, "--worker", model, "--until", str(until)]
    command += ["--steps", str(args.steps), "--threads", str(args.threads)]
    command += ["--data", str(data), "--runs", str(runs)]
    command += ["--resume", resume] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LMLAB_CPU_AUTO": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{model} chunk to step {until} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(model: str, chunks: list[dict], run_dir: Path, eval_at: set[int]) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r and "tokens_per_s" in r]
    evals = [(r["step"], round(r["val_loss"], 4)) for r in records if "val_loss" in r]
    last = chunks[-1]
    out = {
        "model": model,
        "overrides": MODELS[model],
        "total_params": last["total_params"],
        "active_params": last["active_params"],
        "flops_per_token": last["flops_per_token"],
        "val_loss_at": {step: loss for step, loss in evals if step in eval_at},
        "final_val_loss": evals[-1][1],
        "best_val_loss": min(loss for _, loss in evals),
        "final_train_loss": round(trained[-1]["loss"], 4),
        "train_tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in trained)),
        "train_tokens_per_s_windows": [round(r["tokens_per_s"]) for r in trained],
        "peak_rss_bytes": max(c["peak_rss_bytes"] for c in chunks),
        "rss_before_training_bytes": max(c["rss_before_training_bytes"] for c in chunks),
    }
    if model == "moe":
        loads = [r["expert_load_min"] for r in trained if "expert_load_min" in r]
        out["expert_load_min_last"] = round(loads[-1], 4) if loads else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--chunk", type=int, default=200, help="steps per process")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--until", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resume", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    bounds = list(range(args.chunk, args.steps, args.chunk)) + [args.steps]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, runs = tmp / "data", tmp / "runs"
        prepare(
            ["sample:shakespeare"],
            data,
            "char",
            doc_unit="file",
            val_split="tail",
            log=lambda *_: None,
        )
        chunks: dict[str, list[dict]] = {name: [] for name in MODELS}
        for i, until in enumerate(bounds):
            order = list(MODELS) if i % 2 == 0 else list(reversed(MODELS))
            for name in order:
                resume = chunks[name][-1]["run_dir"] if chunks[name] else None
                chunks[name].append(_chunk(name, until, args, data, runs, resume))
        eval_at = {s for s in (100, 200, 400, args.steps) if s <= args.steps}
        results = [
            summary(name, chunks[name], Path(chunks[name][-1]["run_dir"]), eval_at)
            for name in MODELS
        ]
    dense, moe = results
    recipe = build_config(RECIPE).train
    print(
        json.dumps(
            {
                "benchmark": "moe_vs_dense",
                "commit": source_commit(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "threads": args.threads,
                "note": args.note,
                "data": "sample:shakespeare, char-level, tail 10% validates",
                "recipe": RECIPE,
                "steps": args.steps,
                "micro_batch": recipe.micro_batch_size,
                "seq_len": build_config(RECIPE).seq_len,
                "lr": recipe.lr,
                "chunk_steps": args.chunk,
                "runs": results,
                "moe_minus_dense_final_val_loss": round(
                    moe["final_val_loss"] - dense["final_val_loss"], 4
                ),
                "moe_tokens_per_s_over_dense": round(
                    moe["train_tokens_per_s_median"] / dense["train_tokens_per_s_median"], 3
                ),
                "moe_peak_rss_minus_dense_bytes": moe["peak_rss_bytes"] - dense["peak_rss_bytes"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
