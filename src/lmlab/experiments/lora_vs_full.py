"""`lmlab experiment lora-vs-full`: fine-tuning with LoRA vs every weight.

The fine-tuning workshop (`lmlab quickstart --finetune`, lmlab.experiments.workshop) does
the work: a small LLaMA trained on Shakespeare is fine-tuned on FLOWROLL prompt -> result
pairs twice, with LoRA adapters on a frozen base and with every weight, each in its own
process so each peak memory is its own, and both are scored by exact match on held-out
programs. This experiment sets the two side by side: trainable parameters, peak memory,
median step time, validation loss over the fine-tune, exact match before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.experiments.common import Context, curve
from lmlab.experiments.workshop import mib

OPTIONS = {
    "base_steps": "steps of the Shakespeare base model (quick: 10; full: 600)",
    "steps": "fine-tuning steps of each method (quick: 20; full: 800)",
    "programs": "FLOWROLL training programs (quick: 600; full: 8000)",
    "test_programs": "held-out programs scored by exact match (quick: 5; full: 200)",
    "lora_rank": "rank of the LoRA adapters (8)",
}

METHODS = {"lora": "LoRA", "full": "full"}
"""The workshop's fine-tuning methods, and their labels here."""
ADAMW_BYTES_PER_PARAM = 12
"""fp32 gradient plus AdamW's two fp32 moments: what a frozen weight no longer needs."""


def run(ctx: Context) -> dict[str, Any]:
    from lmlab.experiments.workshop import run_workshop
    from lmlab.runs.metrics import read_metrics

    steps = ctx.option("steps", 20 if ctx.quick else 800)
    rank = ctx.option("lora_rank", 8)
    summary = run_workshop(
        ctx.out,
        base_steps=ctx.option("base_steps", 10 if ctx.quick else 600),
        finetune_steps=steps,
        programs=ctx.option("programs", 600 if ctx.quick else 8000),
        test_programs=ctx.option("test_programs", 5 if ctx.quick else 200),
        lora_rank=rank,
        eval_interval=max(5, steps // 10),
        log=lambda message: ctx.log("  " + message) if message.strip() else None,
    )
    every_weight = summary["full"]["trainable_params"]  # full fine-tuning trains them all
    methods = {}
    for method, label in METHODS.items():
        measured = summary[method]
        val_curve = curve(read_metrics(Path(measured["run_dir"])), "val_loss")
        methods[label] = {
            "trainable_params": measured["trainable_params"],
            "trainable_fraction": measured["trainable_params"] / every_weight,
            "peak_memory_bytes": measured["peak_memory_bytes"],
            "step_time_s": measured["step_time_s"],
            "val_loss_before": val_curve[0][1],  # step 0: the base model, before fine-tuning
            "val_loss_after": val_curve[-1][1],
            "exact_match_before": summary["exact_match_base"],
            "exact_match_after": measured["exact_match"],
            "run_dir": measured["run_dir"],
            "val_curve": val_curve,
        }
    lora, full = methods["LoRA"], methods["full"]
    ctx.plot(
        "val_loss.png",
        {label: m["val_curve"] for label, m in methods.items()},
        title=f"fine-tuning on FLOWROLL: LoRA (rank {rank}) vs. every weight",
        xlabel="fine-tuning step",
        ylabel="val loss on completions (nats per token)",
    )
    _bars(ctx, "costs.png", methods, summary["exact_match_base"])

    ctx.lesson(
        f"Both fine-tunes started from the same Shakespeare base ({every_weight:,} "
        f"parameters) and ran {steps} steps on the same FLOWROLL programs. Full fine-tuning "
        f"trained all {every_weight:,} weights; LoRA trained {lora['trainable_params']:,} "
        f"({lora['trainable_fraction']:.1%}): rank-{rank} adapters on every attention and "
        "MLP projection, with the embeddings, the output layer and every original weight "
        "frozen."
    )
    ctx.lesson(_cost_paragraph(lora, full, every_weight))
    ctx.lesson(_quality_paragraph(lora, full, summary["exact_match_base"]))
    ctx.lesson(
        "| | trainable params | share | peak memory (RSS) | median step | val loss "
        "before -> after | exact match before -> after |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {label} | {m['trainable_params']:,} | {m['trainable_fraction']:.1%} | "
            f"{mib(m['peak_memory_bytes'])} | {m['step_time_s'] * 1000:.0f} ms | "
            f"{m['val_loss_before']:.3f} -> {m['val_loss_after']:.3f} | "
            f"{m['exact_match_before']:.1%} -> {m['exact_match_after']:.1%} |"
            for label, m in methods.items()
        )
    )
    return {
        "steps": steps,
        "lora_rank": rank,
        "total_params": every_weight,
        "exact_match_base": summary["exact_match_base"],
        "methods": {
            label: {k: v for k, v in m.items() if k != "val_curve"} for label, m in methods.items()
        },
        "curves": {label: m["val_curve"] for label, m in methods.items()},
    }


def _cost_paragraph(lora: dict, full: dict, every_weight: int) -> str:
    speed = full["step_time_s"] / lora["step_time_s"]
    if speed > 1.1:
        pace = f"LoRA's steps were {speed:.2f}x as fast"
    elif speed < 1 / 1.1:
        pace = f"LoRA's steps were slower: full fine-tuning's were {1 / speed:.2f}x as fast"
    else:
        pace = "the two ran at about the same speed (within 10%)"
    saved = full["peak_memory_bytes"] - lora["peak_memory_bytes"]
    if abs(saved) < 0.02 * full["peak_memory_bytes"]:
        memory = f"within 2% of each other ({mib(abs(saved))} apart)"
    elif saved > 0:
        memory = f"{mib(saved)} less for LoRA"
    else:
        memory = f"{mib(-saved)} more for LoRA"
    frozen_state = (every_weight - lora["trainable_params"]) * ADAMW_BYTES_PER_PARAM
    share = frozen_state / full["peak_memory_bytes"]
    return (
        f"A median LoRA step took {lora['step_time_s'] * 1000:.0f} ms against "
        f"{full['step_time_s'] * 1000:.0f} ms for full fine-tuning: {pace}. Peak memory "
        f"(each process's resident set) was {mib(lora['peak_memory_bytes'])} against "
        f"{mib(full['peak_memory_bytes'])}: {memory}. A frozen weight needs no gradient "
        f"and no AdamW moments, {ADAMW_BYTES_PER_PARAM} bytes in fp32, so LoRA can save at "
        f"most about {mib(frozen_state)} of training state here, {share:.0%} of the peak"
        + (
            ", most of which is the interpreter and torch's libraries. That share grows "
            "with the model: for billions of frozen weights it is most of the memory."
            if share < 0.25
            else "."
        )
    )


def _quality_paragraph(lora: dict, full: dict, base_match: float) -> str:
    text = (
        f"Validation loss on the completions fell from {lora['val_loss_before']:.3f} (the base "
        f"model) to {lora['val_loss_after']:.3f} with LoRA and {full['val_loss_after']:.3f} "
        f"with every weight. Exact match on held-out programs went from {base_match:.1%} to "
        f"{lora['exact_match_after']:.1%} (LoRA) and {full['exact_match_after']:.1%} (full)"
    )
    if max(lora["exact_match_after"], full["exact_match_after"]) <= base_match:
        text += (
            ": neither answered more programs exactly than the base did, a bar that needs "
            "more fine-tuning than this run had. "
        )
    else:
        text += ". "
    gap = lora["val_loss_after"] - full["val_loss_after"]
    if gap > 0.05:
        return text + (
            "Full fine-tuning learned more in the same steps: FLOWROLL's symbols are new to a "
            "Shakespeare model, and only full fine-tuning may move the embeddings and the "
            "output layer that map them; LoRA must reach the new task through low-rank "
            "changes to the projections alone."
        )
    if gap < -0.05:
        return text + (
            "LoRA ended lower here: in this budget its adapters fit the task faster than "
            "the whole model did."
        )
    return text + "The two ended within 0.05 of each other in validation loss."


def _bars(ctx: Context, filename: str, methods: dict[str, dict], base_match: float) -> Path:
    """Four small bar charts side by side: trainable parameters, peak memory, median step
    time and exact match (with the base model's), one bar per method."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmlab.fileio import atomic_write_bytes

    panels = [
        ("trainable parameters", {k: m["trainable_params"] for k, m in methods.items()}),
        ("peak memory (MiB)", {k: m["peak_memory_bytes"] / 2**20 for k, m in methods.items()}),
        ("median step (ms)", {k: m["step_time_s"] * 1000 for k, m in methods.items()}),
        (
            "exact match (%)",
            {"base": base_match * 100}
            | {k: m["exact_match_after"] * 100 for k, m in methods.items()},
        ),
    ]
    colors = {"base": "0.6"} | {label: f"C{i}" for i, label in enumerate(methods)}
    fig = Figure(figsize=(10, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, values) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        bars = ax.bar(list(values), list(values.values()), color=[colors[k] for k in values])
        ax.bar_label(bars, fmt="{:,.0f}" if max(values.values()) >= 100 else "{:.1f}")
        ax.set_title(title, fontsize="medium")
        ax.set_ylim(0, max(1.0, 1.2 * max(values.values())))  # room for the labels
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = ctx.out / filename
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    ctx.plots.append(path)
    return path
