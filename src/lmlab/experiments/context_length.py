"""`lmlab experiment context-length`: the same model trained at several context lengths.

A longer context gives each prediction more text to condition on, and makes attention
cost more per token (each token reads every earlier token of its window). To compare
fairly every run sees the same tokens: the micro-batch shrinks as the context grows, so the
tokens per step (micro-batch x context) and the steps are the same. Each run is validated
at its own context on the same validation text, the last 10% of the shipped Shakespeare
sample, char-level. A context of 1 is a bigram model: it predicts the next character from
the current one alone.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from lmlab.experiments.common import Context, curve

OPTIONS = {
    "preset": "model preset (ultra-tiny)",
    "steps": "training steps of each run (quick: 240; full: 1200)",
    "contexts": "comma-separated context lengths (quick: 1,16,256; full: 1,4,16,64,256)",
    "tokens_per_step": "micro-batch x context, the same in every run (1024)",
}


def run(ctx: Context) -> dict[str, Any]:
    from lmlab.config import load_config
    from lmlab.model.build import flops_per_token

    preset = ctx.option("preset", "ultra-tiny")
    steps = ctx.option("steps", 240 if ctx.quick else 1200)
    default_contexts = "1,16,256" if ctx.quick else "1,4,16,64,256"
    contexts = sorted({int(c) for c in str(ctx.option("contexts", default_contexts)).split(",")})
    tokens_per_step = ctx.option("tokens_per_step", 1024)
    data = ctx.shakespeare_char()
    runs = {}
    # Shortest first: on a CPU, peak memory is the process's resident set so far, so each
    # run's peak also covers the shorter contexts before it.
    for context in contexts:
        micro_batch = max(1, tokens_per_step // context)
        run = ctx.train(
            f"context-{context}",
            preset,
            data,
            [
                f"model.context_length={context}",
                f"train.micro_batch_size={micro_batch}",
                f"train.max_steps={steps}",
                f"train.warmup_steps={max(1, steps // 20)}",
                "train.lr=3e-3",
                "logging.interval=10",
                f"eval.interval={max(10, steps // 10)}",
                "eval.batches=10",
            ],
        )
        history = run["history"]
        logged = [r for r in history if "tokens_per_s" in r]
        model = load_config(run["run_dir"] / "config.yaml").model
        flops = flops_per_token(model, context)
        val_curve = curve(history, "val_loss")
        runs[context] = {
            "context": context,
            "micro_batch": micro_batch,
            "tokens_per_step": micro_batch * context,
            "val_loss": val_curve[-1][1],
            # the first interval also holds the first step's one-off work
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in logged[1:] or logged),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in logged),
            "flops_per_token": flops,
            "attention_flops_share": (flops - flops_per_token(model, 0)) / flops,
            "params": run["params"],
            "seconds": run["seconds"],
            "val_curve": val_curve,
        }
    ctx.plot(
        "val_loss.png",
        {f"context {c}": r["val_curve"] for c, r in runs.items()},
        title=f"{preset}: val loss at each run's own context, {tokens_per_step:,} tokens per step",
        xlabel="step",
        ylabel="val loss (nats per character)",
    )
    ctx.plot(
        "by_context.png",
        {"final val loss": [(c, r["val_loss"]) for c, r in runs.items()]},
        title="final val loss vs. context length (same tokens seen)",
        xlabel="context length (characters)",
        ylabel="val loss (nats per character)",
        log_x=True,
    )
    ctx.plot(
        "speed.png",
        {"training tokens per second": [(c, r["tokens_per_s"]) for c, r in runs.items()]},
        title="training speed vs. context length (same tokens per step)",
        xlabel="context length (characters)",
        ylabel="tokens / s",
        log_x=True,
    )
    _lessons(ctx, runs, steps, tokens_per_step)
    return {
        "preset": preset,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "runs": {str(c): {k: v for k, v in r.items() if k != "val_curve"} for c, r in runs.items()},
        "curves": {str(c): r["val_curve"] for c, r in runs.items()},
    }


def _lessons(ctx: Context, runs: dict[int, dict], steps: int, tokens_per_step: int) -> None:
    shortest, longest = runs[min(runs)], runs[max(runs)]
    best = min(runs.values(), key=lambda r: r["val_loss"])
    ctx.lesson(
        f"Each run trained the same {shortest['params']:,}-parameter model for {steps} steps of "
        f"{tokens_per_step:,} tokens ({steps * tokens_per_step:,} in all): "
        + ", ".join(f"{r['micro_batch']} x {c}" for c, r in runs.items())
        + " (micro-batch x context)."
    )
    losses = ", ".join(f"{r['val_loss']:.3f} at {c}" for c, r in runs.items())
    text = f"Final val loss: {losses}. "
    if longest["val_loss"] < shortest["val_loss"]:
        text += (
            f"The longest context, {longest['context']}, ended "
            f"{shortest['val_loss'] - longest['val_loss']:.3f} below the shortest, "
            f"{shortest['context']}: more text to condition on is a better prediction. "
        )
    else:
        text += (
            f"The longest context, {longest['context']}, did not beat the shortest, "
            f"{shortest['context']}, in this run. "
        )
    losses_in_order = [r["val_loss"] for r in runs.values()]
    if best is not longest:
        text += (
            f"The best was context {best['context']}, not the longest: with the same tokens, "
            "the runs with longer contexts learned more slowly (see their curves). A small "
            "model early in training predicts from the last few characters; to use a long "
            "window it must first learn where in it to look, and its fewer, longer sequences "
            "per step are likely fewer independent examples."
        )
    elif all(a > b for a, b in itertools.pairwise(losses_in_order)):
        text += "Every step up in context was a step down in loss here."
    else:
        text += "The longest context was the best here."
    ctx.lesson(text)
    ctx.lesson(
        f"Attention's share of the training FLOPs per token grows with the window: "
        f"{shortest['attention_flops_share']:.1%} at context {shortest['context']}, "
        f"{longest['attention_flops_share']:.1%} at {longest['context']} (each token attends "
        "to every earlier one in its window: T per token, T^2 per sequence). Measured speed: "
        + ", ".join(f"{r['tokens_per_s']:,.0f} tokens/s at {c}" for c, r in runs.items())
        + ". "
        + _speed_sentence(runs)
        + " "
        + _memory_sentence(runs)
    )
    ctx.lesson(
        "| context | micro-batch | val loss | tokens/s | attention FLOPs | peak memory |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {c} | {r['micro_batch']} | {r['val_loss']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['attention_flops_share']:.1%} | {r['peak_memory_bytes'] / 2**20:,.0f} MiB |"
            for c, r in runs.items()
        )
    )


def _memory_sentence(runs: dict[int, dict]) -> str:
    peaks = [r["peak_memory_bytes"] for r in runs.values()]
    text = (
        "Peak memory (the process's resident set, which also covers the shorter runs before "
        "it) was "
        + ", ".join(f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB at {c}" for c, r in runs.items())
    )
    if max(peaks) < 1.05 * min(peaks):
        return text + (
            ": flat, no longer context needed more than the shorter ones before it. With the "
            "same tokens per step the activations a step keeps are the same size, and a fused "
            "attention kernel does not store the T x T scores."
        )
    return text + f": {(max(peaks) - min(peaks)) / 2**20:,.0f} MiB more for the longest."


def _speed_sentence(runs: dict[int, dict]) -> str:
    shortest, longest = runs[min(runs)], runs[max(runs)]
    fastest = max(runs.values(), key=lambda r: r["tokens_per_s"])
    if fastest is longest:
        return (
            "The longest context was the fastest here: on a CPU a small model's many short "
            "sequences cost overheads of their own, which hide attention's extra work."
        )
    text = (
        f"The fastest was context {fastest['context']}; the longest ran at "
        f"{longest['tokens_per_s'] / fastest['tokens_per_s']:.2f}x its speed."
    )
    if fastest is not shortest:
        text += (
            f" The shortest was slow too, likely for another reason: a micro-batch of "
            f"{shortest['micro_batch']:,} sequences makes many tiny attention problems, each "
            "with a fixed cost."
        )
    return text
