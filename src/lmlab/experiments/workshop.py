"""`lmlab quickstart --finetune`: the fine-tuning workshop, end to end and offline.

1. train a small base LLaMA on general text (Shakespeare, shipped with lmlab);
2. score it on held-out FLOWROLL programs: it has never seen the language;
3. fine-tune it on FLOWROLL prompt -> result pairs twice, with LoRA and with every weight;
4. score both on the same held-out programs, and set LoRA and full side by side:
   trainable parameters, step time, peak memory, exact match.

Each training step runs as its own `lmlab` command (printed, so it can be re-run by hand),
in its own process, so each peak memory is its own.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from lmlab.data.dsl import generate_corpus, get_language, split_line
from lmlab.data.prepare import prepare
from lmlab.data.samples import sample_path
from lmlab.errors import UserError
from lmlab.experiments.quickstart import DIFFICULTY, LANGUAGE, score
from lmlab.model.lora import trainable_parameters
from lmlab.runs.folder import find_runs
from lmlab.runs.load import build_from_checkpoint
from lmlab.runs.metrics import read_metrics

QUIET = ["logging.tensorboard=false", "train.device=cpu"]


def run_workshop(
    out_dir: str | Path = "workshop",
    *,
    base_steps: int = 600,
    finetune_steps: int = 800,
    programs: int = 8000,
    test_programs: int = 100,
    seed: int = 0,
    lora_rank: int = 16,
    eval_interval: int = 100,
    log=print,
) -> dict:
    """Run the workshop; returns the numbers it printed (each fine-tune's `run_dir` holds
    its metrics). lora_rank: of the LoRA adapters; eval_interval: fine-tuning steps between
    two validations."""
    started = time.perf_counter()
    out = Path(out_dir)
    runs = out / "runs"
    data = out / "data" / "shakespeare"
    log(
        f"1/5 a base model: Shakespeare ({sample_path().stat().st_size // 1000} KB), BPE tokenizer, shards"
    )
    prepare([str(sample_path())], data, "bpe:1024", seed=seed, overwrite=True, log=lambda *_: None)
    base = _train(
        log,
        runs,
        "workshop-base",
        ["train", "--preset", "workshop-base", "--data", str(data), "--new"],
        [f"train.max_steps={base_steps}", f"train.seed={seed + 1337}"],
    )
    test = [
        split_line(line)[0]
        for line in generate_corpus(
            get_language(LANGUAGE), test_programs, seed=seed, difficulty=DIFFICULTY, split="test"
        )
    ]
    log(f"2/5 scoring the base on {len(test)} held-out {LANGUAGE.upper()} programs")
    before = _score(base, test)

    data_spec = f"dsl:{LANGUAGE}:{programs}:{DIFFICULTY}"
    results = {}
    for i, (method, lr) in enumerate((("lora", "1e-2"), ("full", "1e-3"))):
        log(f"{3 + i}/5 fine-tuning with {method}: {programs:,} programs -> results")
        run = _train(
            log,
            runs,
            f"finetune-{method}",
            ["finetune", "--from", str(base), "--data", data_spec, "--method", method],
            [
                f"train.max_steps={finetune_steps}",
                f"train.lr={lr}",
                "train.micro_batch_size=32",
                f"eval.interval={eval_interval}",
                "checkpoint.interval=0",
                f"finetune.lora_rank={lora_rank}",
            ],
        )
        results[method] = {**run_costs(run), **_score(run, test), "run_dir": str(run)}

    summary = {"exact_match_base": before["exact_match"], **{m: r for m, r in results.items()}}
    summary["elapsed_s"] = time.perf_counter() - started
    log("")
    log(f"{'':24}{'base':>10}{'LoRA':>14}{'full':>14}")
    lora, full = results["lora"], results["full"]
    rows = [
        (
            "trainable parameters",
            "",
            f"{lora['trainable_params']:,}",
            f"{full['trainable_params']:,}",
        ),
        (
            "step time",
            "",
            f"{lora['step_time_s'] * 1000:.0f} ms",
            f"{full['step_time_s'] * 1000:.0f} ms",
        ),
        ("peak memory (RSS)", "", mib(lora["peak_memory_bytes"]), mib(full["peak_memory_bytes"])),
        ("val loss", "", f"{lora['val_loss']:.3f}", f"{full['val_loss']:.3f}"),
        (
            "exact match",
            f"{before['exact_match']:.1%}",
            f"{lora['exact_match']:.1%}",
            f"{full['exact_match']:.1%}",
        ),
    ]
    for name, *cells in rows:
        log(f"{name:<24}{cells[0]:>10}{cells[1]:>14}{cells[2]:>14}")
    log("")
    log(f"runs: {runs}   (lmlab runs list --runs-dir {runs})")
    log(f'try:  lmlab generate {lora["run_dir"]} --prompt "{test[0]} =>" --temperature 0')
    log(f"done in {summary['elapsed_s']:.0f} s")
    return summary


def _train(log, runs: Path, name: str, argv: list[str], overrides: list[str]) -> Path:
    """Run one `lmlab` training command in its own process; its run folder."""
    argv = [*argv, f"logging.runs_dir={runs}", *QUIET, *overrides]
    log("    $ lmlab " + " ".join(argv))
    before = set(find_runs(runs, name))
    done = subprocess.run(
        [sys.executable, "-m", "lmlab", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise UserError(f"`lmlab {argv[0]}` failed: {done.stderr.strip().splitlines()[-1]}")
    evals = [line for line in done.stdout.splitlines() if ": val loss" in line]
    if evals:
        log(f"    {evals[0].strip()}  ->  {evals[-1].strip()}")
    (run,) = set(find_runs(runs, name)) - before
    return run


def _score(run: Path, programs: list[str]) -> dict:
    model, tokenizer, _, _ = build_from_checkpoint(run, "cpu")
    report, _ = score(model, tokenizer, programs)
    return {
        "exact_match": report["overall"]["exact_match"],
    }


def run_costs(run: Path) -> dict:
    """Trainable parameters, median step time, peak memory and final val loss of a run."""
    history = read_metrics(run)
    steps = [r for r in history if "step_time_s" in r]
    model, _, _, _ = build_from_checkpoint(run, "cpu")
    return {
        "trainable_params": trainable_parameters(model),  # adapters only, for a LoRA run
        "step_time_s": statistics.median(r["step_time_s"] for r in steps[1:] or steps),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in steps),
        "val_loss": [r for r in history if "val_loss" in r][-1]["val_loss"],
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"
