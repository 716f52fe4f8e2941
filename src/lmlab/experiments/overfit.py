"""`lmlab experiment overfit`: the same model trained on 1%, 10% and 100% of a corpus.

With little data the model sees the same text again and again: its training loss keeps
falling while its validation loss (on text it never sees) stops falling and turns back up.
The gap between the two is overfitting, and more data closes it. The corpus is the shipped
Shakespeare sample, char-level, validated on its last 10%; every run has the same model,
steps and batch, so only the amount of distinct training text differs.
"""

from __future__ import annotations

from typing import Any

from lmlab.experiments.common import Context, curve

OPTIONS = {
    "preset": "model preset (quick: ultra-tiny; full: tiny)",
    "steps": "training steps of each run (quick: 150; full: 1000)",
    "fractions": "comma-separated shares of the training text (0.01,0.1,1)",
}


def run(ctx: Context) -> dict[str, Any]:
    preset = ctx.option("preset", "ultra-tiny" if ctx.quick else "tiny")
    steps = ctx.option("steps", 150 if ctx.quick else 1000)
    fractions = [float(f) for f in str(ctx.option("fractions", "0.01,0.1,1")).split(",")]
    settings = [
        "model.context_length=64",
        "train.micro_batch_size=32",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        "train.lr=3e-3",
        "logging.interval=10",
        f"eval.interval={max(10, steps // 10)}",
        "eval.batches=10",
    ]
    runs = {}
    for fraction in fractions:
        data = ctx.shakespeare_subset(fraction)
        label = f"{fraction:.0%} of the text"
        run = ctx.train(f"data-{fraction:g}", preset, data, settings)
        train_curve, val_curve = curve(run["history"], "loss"), curve(run["history"], "val_loss")
        last = [v for _, v in train_curve[-3:]]  # the last 30 steps' training loss
        train_loss, val_loss = sum(last) / len(last), val_curve[-1][1]
        runs[label] = {
            "fraction": fraction,
            "train_tokens": _train_tokens(data),
            "epochs": steps * 32 * 64 / _train_tokens(data),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": min(v for _, v in val_curve),
            "gap": val_loss - train_loss,
            "params": run["params"],
            "seconds": run["seconds"],
            "train_curve": train_curve,
            "val_curve": val_curve,
        }
    ctx.plot(
        "curves.png",
        {
            f"{label} {kind}": r[f"{kind}_curve"]
            for label, r in runs.items()
            for kind in ("train", "val")
        },
        title=f"{preset}: train (solid) and val (dashed) loss on a share of the text",
        xlabel="step",
        ylabel="loss (nats per character)",
        dashed=tuple(f"{label} val" for label in runs),
    )
    ctx.plot(
        "gap.png",
        {"val - train loss": [(r["fraction"] * 100, r["gap"]) for r in runs.values()]},
        title="overfitting gap vs. share of the training text",
        xlabel="% of the training text",
        ylabel="val loss - train loss",
        log_x=True,
    )
    least, most = (
        runs[min(runs, key=lambda k: runs[k]["fraction"])],
        runs[max(runs, key=lambda k: runs[k]["fraction"])],
    )
    ctx.lesson(
        f"Each run trained the same {least['params']:,}-parameter model for {steps} steps. "
        f"On {least['fraction']:.0%} of the text ({least['train_tokens']:,} characters, seen "
        f"{least['epochs']:.0f} times) it ended at train loss {least['train_loss']:.3f} and "
        f"val loss {least['val_loss']:.3f}: a gap of {least['gap']:.3f}. On "
        f"{most['fraction']:.0%} ({most['train_tokens']:,} characters, {most['epochs']:.2f} "
        f"epochs) the gap was {most['gap']:.3f}, with val loss {most['val_loss']:.3f}."
    )
    ctx.lesson(
        "A gap that grows as data shrinks is overfitting: the model learns its training text "
        "rather than the language. "
        + (
            "Here the smallest share overfit the most, as expected."
            if least["gap"] > most["gap"]
            else "This run did not show it (the gap did not shrink with more data): try more "
            "steps or a larger preset."
        )
    )
    ctx.lesson(
        "| share | training characters | epochs | train loss | val loss | best val | gap |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['fraction']:.0%} | {r['train_tokens']:,} | {r['epochs']:.2f} | "
            f"{r['train_loss']:.3f} | {r['val_loss']:.3f} | {r['best_val_loss']:.3f} | "
            f"{r['gap']:.3f} |"
            for r in runs.values()
        )
    )
    return {
        "preset": preset,
        "steps": steps,
        "runs": {
            k: {x: y for x, y in v.items() if not x.endswith("_curve")} for k, v in runs.items()
        },
        "curves": {k: {"train": v["train_curve"], "val": v["val_curve"]} for k, v in runs.items()},
    }


def _train_tokens(data) -> int:
    import json

    return json.loads((data / "manifest.json").read_text())["splits"]["train"]["tokens"]
