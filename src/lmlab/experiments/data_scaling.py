"""`lmlab experiment data-scaling`: val loss against training tokens, for several data sizes.

The same model trains for the same number of tokens on growing shares of the shipped
Shakespeare sample (char-level, validated on the same last 10% every time). A small share
runs out of distinct text early and is repeated: its val loss stops falling, or turns up,
while the model memorizes it. More distinct text keeps val loss falling for longer, so the
lowest val loss a run reaches falls as the data grows.

Results (stable keys, for notebooks):

    results["runs"] = [{"fraction", "train_tokens", "epochs", "best_val_loss",
                        "best_at_tokens", "final_val_loss", "rise", "late_drop",
                        "train_loss", "ending", "params", "seconds"}]
        one per share, smallest first. rise = final - best val loss (>0: it turned up);
        late_drop = val loss at half the budget - final val loss (how much the second
        half of training still helped); ending = "turned up", "levelled off" or
        "still falling" (see _ending)
    results["curves"] = {label: [[tokens seen, val loss], ...]}
    results["preset"], results["steps"], results["tokens"] (seen by every run)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.experiments.common import Context, curve

OPTIONS = {
    "preset": "model preset (ultra-tiny)",
    "steps": "training steps of each run (quick: 150; full: 800)",
    "fractions": "comma-separated shares of the training text "
    "(quick: 0.003,0.03,1; full: 0.003,0.01,0.03,0.1,1)",
}
CONTEXT_LENGTH = 64
MICRO_BATCH_SIZE = 32


def run(ctx: Context) -> dict[str, Any]:
    from lmlab.report.curves import metric_series

    preset = ctx.option("preset", "ultra-tiny")
    steps = ctx.option("steps", 150 if ctx.quick else 800)
    default_fractions = "0.003,0.03,1" if ctx.quick else "0.003,0.01,0.03,0.1,1"
    fractions = sorted(float(f) for f in str(ctx.option("fractions", default_fractions)).split(","))
    tokens = steps * MICRO_BATCH_SIZE * CONTEXT_LENGTH
    settings = [
        f"model.context_length={CONTEXT_LENGTH}",
        f"train.micro_batch_size={MICRO_BATCH_SIZE}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        "train.lr=3e-3",
        "logging.interval=10",
        f"eval.interval={max(15, steps // 20)}",
        "eval.batches=10",
    ]
    runs, curves = [], {}
    for fraction in fractions:
        data = ctx.shakespeare_subset(fraction)
        run = ctx.train(f"data-{fraction:g}", preset, data, settings)
        val = metric_series(run["history"], "val_loss", "tokens")
        train_tokens = _train_tokens(data)
        best_at, best = min(val, key=lambda p: p[1])
        halfway = min(val, key=lambda p: abs(p[0] - tokens / 2))[1]
        last = [v for _, v in curve(run["history"], "loss")[-3:]]
        runs.append(
            {
                "fraction": fraction,
                "train_tokens": train_tokens,
                "epochs": tokens / train_tokens,
                "best_val_loss": best,
                "best_at_tokens": best_at,
                "final_val_loss": val[-1][1],
                "rise": val[-1][1] - best,
                "late_drop": halfway - val[-1][1],
                "train_loss": sum(last) / len(last),
                "params": run["params"],
                "seconds": run["seconds"],
            }
        )
        curves[_label(runs[-1])] = val
    most_drop = max(r["late_drop"] for r in runs)
    for r in runs:
        r["ending"] = _ending(r, most_drop)
    ctx.plot(
        "curves.png",
        curves,
        title=f"{preset}: val loss as training goes on, one line per data size",
        xlabel="training tokens seen (characters)",
        ylabel="val loss (nats per character)",
    )
    ctx.plot(
        "best.png",
        {"best val loss": [(r["train_tokens"], r["best_val_loss"]) for r in runs]},
        title=f"best val loss within {tokens:,} training tokens vs. distinct training text",
        xlabel="distinct training characters (log)",
        ylabel="best val loss (nats per character)",
        log_x=True,
    )
    _lessons(ctx, runs, preset, steps, tokens)
    return {
        "preset": preset,
        "steps": steps,
        "tokens": tokens,
        "runs": runs,
        "curves": {label: [list(p) for p in points] for label, points in curves.items()},
    }


def _ending(r: dict[str, Any], most_drop: float) -> str:
    """How a run's val loss ended: "turned up" (final above best by more than 0.01),
    "levelled off" (its second half gained under half what the best-gaining run's did),
    else "still falling"."""
    if r["rise"] > 0.01:
        return "turned up"
    if r["late_drop"] < 0.5 * most_drop:
        return "levelled off"
    return "still falling"


def _share(fraction: float) -> str:
    """0.003 -> '0.3%', 1 -> '100%'."""
    return f"{fraction * 100:.3g}%"


def _label(r: dict[str, Any]) -> str:
    return f"{_share(r['fraction'])}: {r['train_tokens']:,} chars, {r['epochs']:.1f} epochs"


def _lessons(ctx: Context, runs: list[dict], preset: str, steps: int, tokens: int) -> None:
    small, large = runs[0], runs[-1]
    not_lower = [
        f"{_share(b['fraction'])} ({b['best_val_loss']:.3f}) was no better than "
        f"{_share(a['fraction'])} ({a['best_val_loss']:.3f})"
        for a, b in zip(runs, runs[1:], strict=False)
        if b["best_val_loss"] >= a["best_val_loss"]
    ]
    ctx.lesson(
        f"Each run trained the same {small['params']:,}-parameter {preset} model for {steps} "
        f"steps, {tokens:,} tokens, on a share of the text. The best val loss went from "
        f"{small['best_val_loss']:.3f} on {_share(small['fraction'])} of the text "
        f"({small['train_tokens']:,} characters) to {large['best_val_loss']:.3f} on "
        f"{_share(large['fraction'])} ({large['train_tokens']:,}). "
        + (
            "Every step up in distinct data lowered the best val loss the model could reach "
            "in the same number of tokens (best.png)."
            if not not_lower
            else "Not every step up in data helped here: " + "; ".join(not_lower) + "."
        )
    )
    when = (
        f"Its val loss was lowest, {small['best_val_loss']:.3f}, after "
        f"{small['best_at_tokens']:,.0f} tokens ({small['best_at_tokens'] / small['train_tokens']:.1f}"
        f" epochs), and ended at {small['final_val_loss']:.3f}"
    )
    if small["ending"] == "turned up":
        shape = (
            f"{when}: it turned up by {small['rise']:.3f}"
            + (
                f", while its training loss fell to {small['train_loss']:.3f}: the model "
                "memorized the text it had seen so many times instead of learning the language"
                if small["train_loss"] < small["final_val_loss"] - 0.1
                else ""
            )
            + ". That is overfitting: more steps on the same text only made it worse."
        )
    elif small["ending"] == "levelled off":
        shape = (
            f"{when}: a plateau. The second half of training lowered it by only "
            f"{small['late_drop']:.3f}, against {large['late_drop']:.3f} on "
            f"{_share(large['fraction'])} of the text."
        )
    else:
        shape = (
            f"{when}. It had not yet turned up or levelled off (the second half still "
            f"lowered it by {small['late_drop']:.3f}): try more steps to see where it stops."
        )
    ctx.lesson(
        f"On {_share(small['fraction'])} of the text the model saw each character "
        f"{small['epochs']:.0f} times. {shape} On {_share(large['fraction'])} "
        f"({large['epochs']:.2f} epochs) val loss was still falling at the end "
        f"({large['late_drop']:.3f} over the second half): more distinct text is what lets a "
        "longer run keep paying off."
        if large["late_drop"] > 0
        else f"On {_share(small['fraction'])} of the text the model saw each character "
        f"{small['epochs']:.0f} times. {shape}"
    )
    endings = {
        ending: [r for r in runs if r["ending"] == ending]
        for ending in ("turned up", "levelled off", "still falling")
    }
    ctx.lesson(
        "Across the shares: "
        + "; ".join(
            f"{ending}: " + ", ".join(_share(r["fraction"]) for r in group)
            for ending, group in endings.items()
            if group
        )
        + " (curves.png). Their best val loss came after "
        + ", ".join(f"{r['best_at_tokens']:,.0f}" for r in runs)
        + " tokens: "
        + (
            "the less distinct text, the sooner the model stopped improving."
            if small["best_at_tokens"] < large["best_at_tokens"]
            and all(
                a["best_at_tokens"] <= b["best_at_tokens"]
                for a, b in zip(runs, runs[1:], strict=False)
            )
            else "here it did not come later with every step up in data."
        )
        + (
            " Where the text ran out, more tokens stopped buying lower loss: there the data, "
            "not the budget, set how low the loss could go."
            if endings["turned up"] or endings["levelled off"]
            else " No share ran out of text within this budget: try more steps."
        )
    )
    ctx.lesson(
        "| share | training characters | epochs | best val | at tokens | final val | "
        "rise | drop over 2nd half | ending |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {_share(r['fraction'])} | {r['train_tokens']:,} | {r['epochs']:.2f} | "
            f"{r['best_val_loss']:.3f} | {r['best_at_tokens']:,.0f} | "
            f"{r['final_val_loss']:.3f} | {r['rise']:.3f} | {r['late_drop']:.3f} | "
            f"{r['ending']} |"
            for r in runs
        )
    )


def _train_tokens(data: Path) -> int:
    return json.loads((data / "manifest.json").read_text())["splits"]["train"]["tokens"]
