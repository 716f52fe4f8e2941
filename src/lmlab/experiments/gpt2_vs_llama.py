"""`lmlab experiment gpt2-vs-llama`: the two model families at the same size, same data.

GPT-2 (2019) and LLaMA (2023) are the same idea, a stack of pre-norm transformer blocks,
differing in their parts: GPT-2 adds a learned position vector to each token, normalizes
with LayerNorm, uses a GELU MLP, has biases and shares its input and output embeddings;
LLaMA rotates queries and keys by their position (RoPE), normalizes with RMSNorm, uses a
gated SwiGLU MLP, has no biases and a separate output layer. Built from the same shape
(layers, heads, width) the two land within a few percent of each other in parameters:
SwiGLU's three d_model x 8/3 d_model matrices hold as many weights as GELU's two
d_model x 4 d_model, and GPT-2's position table and biases about balance LLaMA's untied
output layer.

Both train on the same char-level Shakespeare with the same steps, batch, learning rate
and schedule, each with several seeds: a difference between the families means something
only if it is larger than the spread between two seeds of the same family. A seed sets the
initialisation and the data order, so seed s of both families sees the same batches.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from lmlab.experiments.common import Context, curve

OPTIONS = {
    "preset": "model shape, the same for both families (quick: ultra-tiny; full: tiny)",
    "steps": "training steps of each run (quick: 100; full: 500)",
    "seeds": "runs of each family, seeds 1337, 1338, ... (2)",
    "lr": "peak learning rate of both families (3e-3)",
}

FAMILIES = {"gpt2": "GPT-2", "llama": "LLaMA"}
CONTEXT = 64
MICRO_BATCH = 16


def run(ctx: Context) -> dict[str, Any]:
    preset = ctx.option("preset", "ultra-tiny" if ctx.quick else "tiny")
    steps = ctx.option("steps", 100 if ctx.quick else 500)
    seeds = [1337 + i for i in range(ctx.option("seeds", 2))]
    lr = ctx.option("lr", 3e-3)
    data = ctx.shakespeare_char()
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    settings = [
        f"model.context_length={CONTEXT}",
        f"train.micro_batch_size={MICRO_BATCH}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        f"train.lr={lr}",
        "logging.interval=10",
        f"eval.interval={max(10, steps // (4 if ctx.quick else 10))}",
        f"eval.batches={5 if ctx.quick else 20}",
    ]
    runs: dict[str, list[dict[str, Any]]] = {family: [] for family in FAMILIES}
    for seed in seeds:  # seed by seed, so a cut-short experiment still compares pairs
        for family in FAMILIES:
            run = ctx.train(
                f"{family}-seed{seed}",
                preset,
                data,
                [f"model.family={family}", f"train.seed={seed}", *settings],
            )
            history = run["history"]
            train_curve, val_curve = curve(history, "loss"), curve(history, "val_loss")
            last = [v for _, v in train_curve[-3:]]  # the last 30 steps' training loss
            # the first logged interval includes warm-up work (allocations, the first eval)
            timed = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
            runs[family].append(
                {
                    "seed": seed,
                    "params": run["params"],
                    "initial_val_loss": val_curve[0][1],
                    "val_loss": val_curve[-1][1],
                    "train_loss": sum(last) / len(last),
                    "tokens_per_s": statistics.median(timed[1:] or timed),
                    "seconds": run["seconds"],
                    "train_curve": train_curve,
                    "val_curve": val_curve,
                }
            )

    summary = {family: _summarize(family_runs) for family, family_runs in runs.items()}
    gpt2, llama = summary["gpt2"], summary["llama"]
    winner = "llama" if llama["val_loss"] < gpt2["val_loss"] else "gpt2"
    loser = "gpt2" if winner == "llama" else "llama"
    margin = summary[loser]["val_loss"] - summary[winner]["val_loss"]
    noise = max(s["seed_spread"] for s in summary.values())
    beyond_noise = len(seeds) > 1 and margin > noise
    param_gap = abs(gpt2["params"] - llama["params"]) / min(gpt2["params"], llama["params"])

    ctx.plot(
        "curves.png",
        {
            f"{FAMILIES[family]} {kind}": _mean_curve([r[f"{kind}_curve"] for r in family_runs])
            for family, family_runs in runs.items()
            for kind in ("val", "train")
        },
        title=f"{preset} shape, {len(seeds)} seed(s) averaged: val (solid), train (dashed)",
        xlabel="step",
        ylabel="loss (nats per character)",
        dashed=tuple(f"{FAMILIES[family]} train" for family in FAMILIES),
    )

    ctx.lesson(
        f"Both families were built from the `{preset}` shape and trained for {steps} steps of "
        f"{MICRO_BATCH} x {CONTEXT} characters at learning rate {lr:g} (the same schedule), "
        f"{len(seeds)} seed(s) each. GPT-2 has {gpt2['params']:,} parameters and LLaMA "
        f"{llama['params']:,}: {param_gap:.1%} apart. Val loss started at "
        f"{gpt2['initial_val_loss']:.2f} (GPT-2) and {llama['initial_val_loss']:.2f} (LLaMA), "
        f"about a uniform guess over the {vocab} token ids (ln {vocab} = {math.log(vocab):.2f}), "
        f"and fell to {gpt2['val_loss']:.3f} and {llama['val_loss']:.3f}, averaged over seeds. "
        "The learning rate was not tuned for either: a family that prefers another rate is "
        "handicapped here."
    )
    spread = (
        f"Two seeds of the same family ended up to {noise:.3f} apart (GPT-2 "
        f"{gpt2['seed_spread']:.3f}, LLaMA {llama['seed_spread']:.3f})"
        if len(seeds) > 1
        else "With one seed per family there is no measure of run-to-run noise"
    )
    if beyond_noise:
        verdict = (
            f"{FAMILIES[winner]} ended lower, by {margin:.3f} nats per character. {spread}, "
            "so the difference is larger than the noise between runs: at this size and "
            f"budget, {FAMILIES[winner]}'s parts learn faster."
        )
    else:
        verdict = (
            f"{FAMILIES[winner]} ended lower, by {margin:.3f} nats per character. {spread}, "
            "so this difference is within run-to-run noise: at this size and budget the two "
            "families are not told apart. More steps or seeds (options `steps=N`, "
            "`seeds=N`) would settle it."
        )
    ctx.lesson(verdict)
    faster = "gpt2" if gpt2["tokens_per_s"] > llama["tokens_per_s"] else "llama"
    slower = "llama" if faster == "gpt2" else "gpt2"
    speedup = summary[faster]["tokens_per_s"] / summary[slower]["tokens_per_s"] - 1
    ctx.lesson(
        f"Speed: {FAMILIES[faster]} trained at {summary[faster]['tokens_per_s']:,.0f} tokens/s "
        f"and {FAMILIES[slower]} at {summary[slower]['tokens_per_s']:,.0f}"
        + (
            f", {speedup:.0%} apart: about the same, as their matmuls are the same size (on a "
            "shared CPU, differences of a few percent are timing noise)."
            if speedup < 0.1
            else f": {FAMILIES[faster]} was {speedup:.0%} faster. The matmuls are the same "
            "size, so the difference is in the small operations around them (LayerNorm vs. "
            "RMSNorm, GELU vs. SwiGLU's gate, RoPE's rotations), or in the load of a shared "
            "machine."
        )
    )
    ctx.lesson(
        "| family | seed | parameters | final train loss | final val loss | tokens/s |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {FAMILIES[family]} | {r['seed']} | {r['params']:,} | {r['train_loss']:.3f} | "
            f"{r['val_loss']:.3f} | {r['tokens_per_s']:,.0f} |"
            for family, family_runs in runs.items()
            for r in family_runs
        )
        + "\n"
        + "\n".join(
            f"| {FAMILIES[family]} | mean | {s['params']:,} | {s['train_loss']:.3f} | "
            f"{s['val_loss']:.3f} | {s['tokens_per_s']:,.0f} |"
            for family, s in summary.items()
        )
    )
    return {
        "preset": preset,
        "steps": steps,
        "seeds": seeds,
        "lr": lr,
        "tokens_per_step": MICRO_BATCH * CONTEXT,
        "winner": winner,
        "margin": margin,
        "seed_spread": noise,
        "beyond_noise": beyond_noise,
        "param_gap": param_gap,
        "families": summary,
        "runs": {
            family: [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in rs]
            for family, rs in runs.items()
        },
        "curves": {
            family: [
                {"seed": r["seed"], "train": r["train_curve"], "val": r["val_curve"]} for r in rs
            ]
            for family, rs in runs.items()
        },
    }


def _summarize(family_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means of a family's final numbers, and the spread of its final val loss."""
    val = [r["val_loss"] for r in family_runs]
    return {
        "params": family_runs[0]["params"],
        "initial_val_loss": statistics.mean(r["initial_val_loss"] for r in family_runs),
        "val_loss": statistics.mean(val),
        "train_loss": statistics.mean(r["train_loss"] for r in family_runs),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in family_runs),
        "seed_spread": max(val) - min(val),
    }


def _mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Pointwise mean of curves logged at the same steps (seeds of one family)."""
    by_step: dict[float, list[float]] = {}
    for points in curves:
        for step, value in points:
            by_step.setdefault(step, []).append(value)
    return [(s, statistics.mean(v)) for s, v in sorted(by_step.items()) if len(v) == len(curves)]
