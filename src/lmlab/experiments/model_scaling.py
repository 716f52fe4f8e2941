"""`lmlab experiment model-scaling`: loss against model size at a fixed token budget.

Several LLaMA shapes of increasing depth and width train on the same tokens of the shipped
Shakespeare sample (char-level, validated on its last 10%), with the same batch, context,
learning rate and schedule, so only the size differs. A power law L(N) = a * N^-alpha is
fitted to (N, final val loss) by least squares on log L = log a - alpha log N. With four or
five points that two-parameter fit is the honest one: an irreducible term (L = c + a N^-alpha)
would leave too few degrees of freedom to pin three parameters down, so the fitted alpha is
the slope of the whole loss, irreducible part included. Its 95% interval comes from the
slope's standard error and Student's t with n - 2 degrees of freedom.

N counts the non-embedding parameters by default (every weight but the token-embedding
table; the output head counts, as `lmlab.model.build.param_count` counts it), the
convention of Kaplan et al. (2020), who found it gives the cleaner power law: at this scale
the embedding table is a large share of the smallest models. The option `count=total` fits
all parameters instead. The Chinchilla prediction
(`lmlab.estimate.scaling.predicted_loss`) always takes the total, as that paper counted.

Results (stable keys, for notebooks):

    results["fit"] = {"alpha", "alpha_ci95": [lo, hi], "a", "r2", "stderr", "points"}
        L(N) = a * N^-alpha, fitted in log-log space; stderr is the slope's
    results["points"] = [{"shape", "n_layer", "n_head", "d_model", "params",
                          "non_embedding_params", "total_params", "val_loss",
                          "train_loss", "chinchilla_loss", "training_flops",
                          "tokens_per_param", "seconds"}]
        one per model, smallest first; "params" is the N of the fit (see "count")
    results["bend"] = {"alpha_smaller", "alpha_larger", "points_each"}
        the same slope fitted to the smallest and to the largest sizes alone
    results["chinchilla"] = {"alpha", "beta", "E", "A", "B", "effective_alpha"}
        the paper's constants, and the same two-parameter fit made to its predictions at
        these N and tokens (comparable with fit["alpha"])
    results["count"], results["steps"], results["tokens"] (the fixed budget),
    results["context_length"], results["micro_batch_size"]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmlab.errors import UserError
from lmlab.experiments.common import Context, curve

OPTIONS = {
    "shapes": "comma-separated LAYERSxHEADSxWIDTH model shapes, smallest first "
    "(quick: 1x2x16,1x2x24,2x2x32,2x4x40,2x4x48; full: 1x2x16,2x2x32,2x4x48,3x4x64,4x4x128)",
    "steps": "training steps of every run, the fixed token budget with batch 32 x context 64 "
    "(quick: 120; full: 600)",
    "count": "what N counts in the fit: non-embedding (default) or total parameters",
}
COUNTS = ("non-embedding", "total")
CONTEXT_LENGTH = 64
MICRO_BATCH_SIZE = 32

# Student's t, 97.5% quantile (a two-sided 95% interval), for 1..30 degrees of freedom;
# the standard table values (they match scipy.stats.t.ppf(0.975, dof) to 3 decimals).
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """Student's t 97.5% quantile: the table to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal's 1.95996 (within 1e-3 beyond 30)."""
    if dof < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {dof}")
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def fit_power_law(sizes: list[float], losses: list[float]) -> dict[str, Any]:
    """L = a * N^-alpha by least squares in log-log space: {"alpha", "alpha_ci95",
    "a", "r2", "stderr", "points"}; at least 3 points (1 degree of freedom for the CI)."""
    if len(sizes) < 3:
        raise UserError(f"a power-law fit with an interval needs 3 or more sizes, got {len(sizes)}")
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(losses, float))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    dof = len(x) - 2
    sxx = float(((x - x.mean()) ** 2).sum())
    stderr = math.sqrt(float((residual**2).sum()) / dof / sxx)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    half = t_quantile_975(dof) * stderr
    return {
        "alpha": float(-slope),
        "alpha_ci95": [float(-slope - half), float(-slope + half)],
        "a": float(math.exp(intercept)),
        "r2": r2,
        "stderr": stderr,
        "points": len(x),
    }


def run(ctx: Context) -> dict[str, Any]:
    from lmlab.config import load_config
    from lmlab.estimate import scaling
    from lmlab.model.build import param_count

    default_shapes = (
        "1x2x16,1x2x24,2x2x32,2x4x40,2x4x48" if ctx.quick else "1x2x16,2x2x32,2x4x48,3x4x64,4x4x128"
    )
    shapes = [_shape(s) for s in str(ctx.option("shapes", default_shapes)).split(",")]
    steps = ctx.option("steps", 120 if ctx.quick else 600)
    count = ctx.option("count", "non-embedding")
    if count not in COUNTS:
        raise UserError(f"count must be one of {', '.join(COUNTS)}, got {count!r}")
    tokens = steps * MICRO_BATCH_SIZE * CONTEXT_LENGTH
    data = ctx.shakespeare_char()
    settings = [
        f"model.context_length={CONTEXT_LENGTH}",
        f"train.micro_batch_size={MICRO_BATCH_SIZE}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        "train.lr=3e-3",
        "logging.interval=10",
        f"eval.interval={steps}",  # only the final loss enters the fit
        "eval.batches=20",
    ]
    points = []
    for n_layer, n_head, d_model in shapes:
        shape = f"{n_layer}x{n_head}x{d_model}"
        run = ctx.train(
            f"model-{shape}",
            "ultra-tiny",  # a LLaMA teaching preset; the shape overrides its size
            data,
            [
                *settings,
                f"model.n_layer={n_layer}",
                f"model.n_head={n_head}",
                f"model.d_model={d_model}",
            ],
        )
        model = load_config(run["run_dir"] / "config.yaml").model
        vocab_size = model.vocab_size  # the tokenizer's: the same for every shape
        total = param_count(model)
        non_embedding = param_count(model, exclude_embeddings=True)
        last = [v for _, v in curve(run["history"], "loss")[-3:]]
        points.append(
            {
                "shape": shape,
                "n_layer": n_layer,
                "n_head": n_head,
                "d_model": d_model,
                "params": non_embedding if count == "non-embedding" else total,
                "non_embedding_params": non_embedding,
                "total_params": total,
                "val_loss": curve(run["history"], "val_loss")[-1][1],
                "train_loss": sum(last) / len(last),
                "chinchilla_loss": scaling.predicted_loss(total, tokens),
                "training_flops": scaling.training_flops(total, tokens),
                "tokens_per_param": tokens / total,
                "seconds": run["seconds"],
            }
        )
    points.sort(key=lambda p: p["params"])
    fit = fit_power_law([p["params"] for p in points], [p["val_loss"] for p in points])
    chinchilla_fit = fit_power_law(
        [p["params"] for p in points], [p["chinchilla_loss"] for p in points]
    )
    # the same fit over the smaller and the larger half of the sizes: does the line bend?
    half = len(points) // 2 + 1
    bend = {
        "alpha_smaller": fit_slope(points[:half]),
        "alpha_larger": fit_slope(points[-half:]),
        "points_each": half,
    }
    _plots(ctx, points, fit, count, tokens)
    _lessons(ctx, points, fit, bend, chinchilla_fit["alpha"], count, steps, tokens, vocab_size)
    return {
        "count": count,
        "steps": steps,
        "tokens": tokens,
        "context_length": CONTEXT_LENGTH,
        "micro_batch_size": MICRO_BATCH_SIZE,
        "fit": fit,
        "bend": bend,
        "points": points,
        "chinchilla": {
            "alpha": scaling.ALPHA,
            "beta": scaling.BETA,
            "E": scaling.E,
            "A": scaling.A,
            "B": scaling.B,
            "effective_alpha": chinchilla_fit["alpha"],
        },
    }


def fit_slope(points: list[dict[str, Any]]) -> float:
    """alpha of the least-squares line through (log params, log val_loss); 2+ points."""
    x = np.log([p["params"] for p in points])
    y = np.log([p["val_loss"] for p in points])
    return float(-np.polyfit(x, y, 1)[0])


def _shape(text: str) -> tuple[int, int, int]:
    """'2x4x48' -> (n_layer, n_head, d_model)."""
    try:
        n_layer, n_head, d_model = (int(v) for v in text.strip().lower().split("x"))
    except ValueError:
        raise UserError(f"a shape is LAYERSxHEADSxWIDTH, such as 2x4x48; got {text!r}") from None
    if d_model % n_head:
        raise UserError(f"shape {text}: the width {d_model} is not divisible by {n_head} heads")
    return n_layer, n_head, d_model


def _plots(ctx: Context, points: list[dict], fit: dict, count: str, tokens: int) -> None:
    sizes = [p["params"] for p in points]
    grid = np.geomspace(min(sizes), max(sizes), 50)
    line = [(float(n), fit["a"] * float(n) ** -fit["alpha"]) for n in grid]
    fit_label = f"fit: {fit['a']:.2f} N^-{fit['alpha']:.3f}"
    lo, hi = fit["alpha_ci95"]
    ctx.plot(
        "fit.png",
        {"measured val loss": [(p["params"], p["val_loss"]) for p in points], fit_label: line},
        title=f"{tokens:,} tokens each: alpha {fit['alpha']:.3f} "
        f"(95% CI {lo:.3f} to {hi:.3f}), R^2 {fit['r2']:.3f}",
        xlabel=f"N, {count} parameters (log)",
        ylabel="val loss, nats per character (log)",
        log_x=True,
        log_y=True,
        dashed=(fit_label,),
    )
    prediction = "Chinchilla L(N, D), nats per BPE token (total N)"
    ctx.plot(
        "chinchilla.png",
        {
            "measured, nats per character": [(p["total_params"], p["val_loss"]) for p in points],
            prediction: [(p["total_params"], p["chinchilla_loss"]) for p in points],
        },
        title="measured vs. Chinchilla's fit, extrapolated far below its 70M-16B models",
        xlabel="N, total parameters (log)",
        ylabel="loss (log)",
        log_x=True,
        log_y=True,
        dashed=(prediction,),
    )


def _lessons(
    ctx: Context,
    points: list[dict],
    fit: dict,
    bend: dict,
    chinchilla_alpha: float,
    count: str,
    steps: int,
    tokens: int,
    vocab_size: int,
) -> None:
    from lmlab.estimate import scaling

    small, large = points[0], points[-1]
    worse = [
        f"{b['shape']} ({b['val_loss']:.3f}) did not beat {a['shape']} ({a['val_loss']:.3f})"
        for a, b in zip(points, points[1:], strict=False)
        if b["val_loss"] >= a["val_loss"]
    ]
    ctx.lesson(
        f"{len(points)} LLaMA shapes (layers x heads x width), from {small['shape']} with "
        f"{small['params']:,} {count} parameters to {large['shape']} with "
        f"{large['params']:,}, each trained for {steps} steps on the same {tokens:,} "
        f"characters ({MICRO_BATCH_SIZE} sequences of {CONTEXT_LENGTH} per step). Val loss "
        f"went from {small['val_loss']:.3f} to {large['val_loss']:.3f} nats per character. "
        + (
            "Every larger model reached a lower loss on the same tokens."
            if not worse
            else "Not every step up in size helped here: " + "; ".join(worse) + "."
        )
    )
    lo, hi = fit["alpha_ci95"]
    dof = fit["points"] - 2
    ctx.lesson(
        f"A straight line in log-log space, log L = log a - alpha log N, gives "
        f"L(N) = {fit['a']:.3f} N^-{fit['alpha']:.3f}: alpha = {fit['alpha']:.3f}, 95% "
        f"interval {lo:.3f} to {hi:.3f} (the slope's standard error {fit['stderr']:.4f} "
        f"times Student's t for {dof} degrees of freedom, {t_quantile_975(dof):.3f}), "
        f"R^2 = {fit['r2']:.3f}. With {fit['points']} points only these two parameters are "
        "fitted: an irreducible loss c in L = c + a N^-alpha would leave "
        f"{fit['points'] - 3} degrees of freedom, too few to pin it down. So this alpha is "
        "the slope of the whole loss, the part no model size removes included. "
        + (
            "The interval lies above zero: at this budget, loss falls as a power of size."
            if lo > 0
            else "The interval reaches zero or below: these points do not establish that "
            "loss falls with size. Try more steps or a wider range of shapes."
        )
    )
    smaller, larger, each = bend["alpha_smaller"], bend["alpha_larger"], bend["points_each"]
    halves = (
        f"Fitted to the {each} smallest sizes alone the slope is alpha = {smaller:.3f}; to "
        f"the {each} largest, {larger:.3f}. "
    )
    if larger < 0.75 * smaller:
        halves += (
            "The line bends: loss falls more slowly as the models grow. Chinchilla's form "
            "names two reasons. The loss has a floor that no size removes (its E), and at a "
            f"fixed budget the larger models get fewer tokens each: {large['tokens_per_param']:.1f}"
            f" per parameter for the largest against {small['tokens_per_param']:.0f} for the "
            f"smallest (compute-optimal is about {scaling.TOKENS_PER_PARAM:.0f}), so the data, "
            "not the size, starts to set their loss. The straight line summarizes this curve "
            f"(R^2 = {fit['r2']:.3f}); it should not be extended beyond it."
        )
    elif larger > smaller / 0.75:
        halves += (
            "The larger sizes fell faster than the smaller ones: over this range the line "
            "has not yet bent toward a floor (single runs are noisy, so one point can tilt a "
            "half)."
        )
    else:
        halves += "The two halves agree to within a quarter: over this range one power law fits."
    ctx.lesson(halves)
    lowest = min(p["chinchilla_loss"] for p in points)
    highest = max(p["chinchilla_loss"] for p in points)
    ctx.lesson(
        f"Chinchilla (Hoffmann et al. 2022) fits L(N, D) = {scaling.E} + {scaling.A}/N^"
        f"{scaling.ALPHA} + {scaling.B}/D^{scaling.BETA}. Its alpha = {scaling.ALPHA} is the "
        "exponent of the reducible term A/N^alpha alone, after the irreducible "
        f"E = {scaling.E} is taken off; read as ours is (a two-parameter fit to its total "
        f"predicted loss at these N and D), its slope here is {chinchilla_alpha:.3f}, "
        + (
            f"steeper than the measured {fit['alpha']:.3f}."
            if chinchilla_alpha > fit["alpha"]
            else f"no steeper than the measured {fit['alpha']:.3f}."
        )
        + f" Its absolute predictions, {lowest:.1f} to {highest:.1f} nats per token, are "
        f"nothing like the measured {large['val_loss']:.2f} to {small['val_loss']:.2f} nats "
        f"per character (a uniform guess over the {vocab_size} tokens of the vocabulary scores "
        f"ln {vocab_size} = {math.log(vocab_size):.2f}): it was fitted to the loss per BPE "
        "token, several characters each, of MassiveText, with models of 70 million "
        f"to 16 billion parameters, and here it is extrapolated to {small['total_params']:,}"
        f"-{large['total_params']:,} (chinchilla.png). Use it for trends at scale, not for "
        "the loss of a tiny character model."
    )
    ctx.lesson(
        f"| shape | {count} N | total params | train FLOPs (6ND) | train loss | val loss | "
        "Chinchilla |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {p['shape']} | {p['params']:,} | {p['total_params']:,} | "
            f"{p['training_flops']:.2e} | {p['train_loss']:.3f} | {p['val_loss']:.3f} | "
            f"{p['chinchilla_loss']:.1f} |"
            for p in points
        )
    )
