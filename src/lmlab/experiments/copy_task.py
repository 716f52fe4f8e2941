"""`lmlab experiment copy-task`: a small LLaMA learns to copy random strings.

The classic sanity check of a sequence model. Each line is a random string of symbols,
a bar, and the string again: `dbeaj|dbeaj`. The first half is noise and cannot be learned;
the second half is fully determined by the first, so a model that works (attention that
can look back the right distance, positions it can tell apart, a loop that optimizes) must
learn to copy it exactly. A setup that cannot learn this usually has a bug.

The run saves a checkpoint every few steps; each is loaded the way `lmlab generate` loads
one and prompted with `\\nSTRING|` for held-out strings (never in the training text),
greedy-decoding until the end of the line. Exact match: the whole copy is right; per-symbol
accuracy: the share of positions copied right. The validation loss cannot fall below the
entropy of the random symbols (`_loss_floor`), however well the model copies.

The quick mode's strings all have one length (5), so every copy looks back the same
distance; the full mode's lengths vary (8 to 16), so the distance does too. While this
experiment was built, the first was copied after about 100 steps of 16 rows, the second
took about 1,800 steps of 32 rows.

The weights start with standard deviation 0.07, not lmlab's 0.02 (GPT-2's, for models 768
wide). Learning where to look is a saddle: with small weights every attention score starts
near zero, uniform attention carries no signal about position, and the gradient that would
sharpen it is small too. While this experiment was built, `ultra-tiny` with 0.02 still sat
at the unigram loss after 300 steps for three seeds out of three; with 0.07 all three
reached the floor by step 200. The option `init_std=0.02` shows the plateau.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

from lmlab.errors import UserError
from lmlab.experiments.common import Context, curve

OPTIONS = {
    "steps": "training steps (quick: 300; full: 3000)",
    "points": "checkpoints scored along the way (quick: 6; full: 15)",
    "symbols": "alphabet size (quick: 10; full: 26)",
    "lengths": "string lengths MIN-MAX (quick: 5-5; full: 8-16)",
    "test": "held-out strings scored at each checkpoint (200)",
    "preset": "model preset (ultra-tiny)",
    "batch": "sequences of 64 characters per step (quick: 16; full: 32)",
    "lr": "peak learning rate (3e-3)",
    "init_std": "standard deviation of the initial weights (0.07; lmlab's default is 0.02)",
}

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SEPARATOR = "|"
VAL_LINES = 2_000
CONTEXT = 64
TARGET = 0.95
"""The exact-match accuracy whose first crossing the lesson quotes."""


def run(ctx: Context) -> dict[str, Any]:
    steps = ctx.option("steps", 300 if ctx.quick else 3000)
    points = ctx.option("points", 6 if ctx.quick else 15)
    symbols = ctx.option("symbols", 10 if ctx.quick else 26)
    shortest, longest = _lengths(ctx.option("lengths", "5-5" if ctx.quick else "8-16"))
    n_test = ctx.option("test", 200)
    preset = ctx.option("preset", "ultra-tiny")
    batch = ctx.option("batch", 16 if ctx.quick else 32)
    lr = ctx.option("lr", 3e-3)
    init_std = ctx.option("init_std", 0.07)
    if not 2 <= symbols <= len(ALPHABET):
        raise UserError(f"symbols must be 2 to {len(ALPHABET)}, got {symbols}")
    alphabet = ALPHABET[:symbols]

    mean_line = shortest + longest + 2  # characters of an average line, newline included
    train_lines = steps * batch * CONTEXT // mean_line + 1  # a single pass: none repeats
    data, test = _copy_data(ctx.out / "data", alphabet, shortest, longest, n_test, train_lines)
    interval = max(1, steps // points)
    run = ctx.train(
        "copy",
        preset,
        data,
        [
            f"model.context_length={CONTEXT}",
            f"train.micro_batch_size={batch}",
            f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, steps // 20)}",
            f"train.lr={lr}",
            f"model.init_std={init_std}",
            "logging.interval=10",
            f"eval.interval={interval}",
            "eval.batches=10",
            f"checkpoint.interval={interval}",  # after QUIET's 0: a checkpoint to score each time
            f"checkpoint.keep_last={steps // interval + 1}",
            "checkpoint.keep_best=false",
        ],
    )
    scores = [_score(ckpt, test, longest) for ckpt in _checkpoints(run["run_dir"])]

    first = next((s["step"] for s in scores if s["exact_match"] > TARGET), None)
    final = scores[-1]
    floor = _loss_floor(symbols, shortest, longest)
    sizes = f"{shortest}" if shortest == longest else f"{shortest} to {longest}"
    val_curve = curve(run["history"], "val_loss")

    ctx.plot(
        "accuracy.png",
        {
            "exact match (whole copy)": [(s["step"], s["exact_match"]) for s in scores],
            "per symbol": [(s["step"], s["symbol_accuracy"]) for s in scores],
        },
        title=f"copying strings of {sizes} random symbols (of {symbols}): held-out accuracy",
        xlabel="step",
        ylabel="accuracy",
    )
    ctx.plot(
        "loss.png",
        {
            "val loss": val_curve,
            "floor: the random symbols": [(0, floor), (steps, floor)],
        },
        title="val loss, and about the lowest a perfect copier gets (random symbols)",
        xlabel="step",
        ylabel="loss (nats per character)",
        dashed=("floor: the random symbols",),
    )

    ctx.lesson(
        f"A {run['params']:,}-parameter LLaMA (`{preset}`, initial weights of standard "
        f"deviation {init_std:g}) trained for {steps} steps of {batch} x {CONTEXT} characters on "
        f"{train_lines:,} lines like `{test[0]}{SEPARATOR}{test[0]}` (random strings of "
        f"{sizes} of {symbols} symbols). Every {interval} steps it was asked "
        f"to copy {len(test)} strings it never saw."
    )
    if first is not None:
        reached = (
            f"Exact-match accuracy first exceeded {TARGET:.0%} at step {first} "
            f"({first / steps:.0%} of the run) and ended at {final['exact_match']:.1%}, "
            f"with {final['symbol_accuracy']:.1%} of symbols right."
        )
    else:
        reached = (
            f"Exact-match accuracy never exceeded {TARGET:.0%}: it ended at "
            f"{final['exact_match']:.1%} ({final['symbol_accuracy']:.1%} of symbols). With "
            "copying this is a sign of too few steps or a bug, not of a hard task: try more "
            "steps."
        )
    ctx.lesson(reached)
    pairs = list(itertools.pairwise(scores))
    before, after = max(
        pairs, key=lambda p: p[1]["exact_match"] - p[0]["exact_match"], default=(None, None)
    )
    if before is not None and after["exact_match"] > before["exact_match"]:
        ctx.lesson(
            f"The biggest rise between two checkpoints came from step {before['step']} to "
            f"{after['step']}: exact match from {before['exact_match']:.1%} to "
            f"{after['exact_match']:.1%} (per symbol {before['symbol_accuracy']:.1%} to "
            f"{after['symbol_accuracy']:.1%}). A string counts only when every symbol of it "
            "is right, so exact match is the stricter score."
        )
    learned = final["exact_match"] >= TARGET
    ctx.lesson(
        f"The val loss ended at {val_curve[-1][1]:.3f} nats per character, "
        f"{val_curve[-1][1] - floor:.3f} above a floor of about {floor:.3f} that no model "
        "gets under: the first halves are random, and so is a copy whose original was cut off "
        f"at the start of a {CONTEXT}-character validation window. "
        + (
            "A loss that stops well above zero can still belong to a model that has learned "
            "everything there is to learn, as this one copies."
            if learned
            else "The copies are not yet right, so part of the gap is copying still to learn."
        )
    )
    ctx.lesson(
        "| step | exact match | per-symbol accuracy |\n|---|---|---|\n"
        + "\n".join(
            f"| {s['step']} | {s['exact_match']:.1%} | {s['symbol_accuracy']:.1%} |" for s in scores
        )
    )
    return {
        "preset": preset,
        "init_std": init_std,
        "params": run["params"],
        "steps": steps,
        "symbols": symbols,
        "lengths": [shortest, longest],
        "test_strings": len(test),
        "train_lines": train_lines,
        "first_step_above_target": first,
        "target": TARGET,
        "final_exact_match": final["exact_match"],
        "final_symbol_accuracy": final["symbol_accuracy"],
        "loss_floor": floor,
        "final_val_loss": val_curve[-1][1],
        "train_seconds": run["seconds"],
        "scores": scores,
        "val_curve": val_curve,
        "examples": final["examples"],
    }


def _loss_floor(symbols: int, shortest: int, longest: int) -> float:
    """About the lowest val loss (nats per character) a model that copies perfectly gets.

    A line of length L (uniform in shortest..longest) is n = 2L + 2 characters: L random
    symbols at ln(symbols) nats each, and where it ends, ln(number of lengths) nats; the
    copy and the separators cost nothing. But validation reads windows of CONTEXT
    characters cut anywhere in the stream, and a window that begins inside a line has lost
    the start of the original whose copy it holds: averaged over where the cut falls, a
    line of length L loses L(L + 1) / n copied symbols, each as random as the original.
    """
    lengths = range(shortest, longest + 1)
    line = sum(2 * n + 2 for n in lengths) / len(lengths)  # mean characters of a line
    per_line = sum(lengths) / len(lengths) * math.log(symbols) + math.log(len(lengths))
    cut_copies = sum(n * (n + 1) for n in lengths) / len(lengths) / line  # per window
    return per_line / line + cut_copies * math.log(symbols) / CONTEXT


def _lengths(text: str) -> tuple[int, int]:
    """`MIN-MAX` (or one number) -> (MIN, MAX), checked so that a line fits the context."""
    most = CONTEXT // 2 - 2  # STRING|STRING and its newline, with room to generate
    try:
        low, _, high = str(text).partition("-")
        shortest, longest = int(low), int(high or low)
    except ValueError:
        shortest = longest = 0
    if not 1 <= shortest <= longest <= most:
        raise UserError(
            f"lengths must be MIN-MAX with 1 <= MIN <= MAX <= {most} (a line must fit the "
            f"context of {CONTEXT}), got {text!r}"
        )
    return shortest, longest


def _copy_data(
    folder: Path, alphabet: str, shortest: int, longest: int, n_test: int, n_train: int
) -> tuple[Path, list[str]]:
    """Train and val text of `STRING|STRING` lines, prepared with a char tokenizer trained
    on the train text; and `n_test` held-out strings, none of them in the train text."""
    from lmlab.data.prepare import prepare

    rng = random.Random(0)

    def draw() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(shortest, longest)))

    test: list[str] = []
    while len(test) < n_test:  # distinct, so the score counts n_test different strings
        s = draw()
        if s not in test:
            test.append(s)
    held_out = set(test)
    train: list[str] = []
    while len(train) < n_train:
        s = draw()
        if s not in held_out:
            train.append(s)
    val = [draw() for _ in range(VAL_LINES)]
    # one folder per setting: a rerun with other options in the same OUT prepares afresh
    name = f"copy-{len(alphabet)}-symbols-{shortest}-{longest}-{n_train}-lines"
    data, text = folder / name, folder / f"{name}-text"
    if not (data / "manifest.json").is_file():
        text.mkdir(parents=True, exist_ok=True)
        for split, strings in (("train", train), ("val", val)):
            lines = "".join(f"{s}{SEPARATOR}{s}\n" for s in strings)
            (text / f"{split}.txt").write_text(lines, encoding="utf-8")
        prepare(
            [str(text / "train.txt")],
            data,
            "char",  # the train text holds every symbol, so nothing is unknown
            doc_unit="file",
            val_inputs=[str(text / "val.txt")],
            overwrite=True,
            log=lambda *_: None,
        )
    return data, test


def _checkpoints(run_dir: Path) -> list[Path]:
    from lmlab.runs.checkpoint import list_checkpoints

    return list_checkpoints(run_dir)


def _score(ckpt: Path, test: list[str], longest: int) -> dict[str, Any]:
    """Greedy copies of `\\nSTRING|` from one checkpoint: exact match and per-symbol
    accuracy over the held-out strings."""
    from lmlab.generate.batch import generate_batch
    from lmlab.runs.checkpoint import read_meta
    from lmlab.runs.load import build_from_checkpoint

    model, tokenizer, _, _ = build_from_checkpoint(ckpt, "cpu")
    (newline,) = tokenizer.encode("\n")
    outputs = generate_batch(
        model,
        [tokenizer.encode(f"\n{s}{SEPARATOR}") for s in test],
        max_new_tokens=longest + 1,  # the copy and its newline
        stop_token_ids=[newline, tokenizer.eot_id],
        pad_id=tokenizer.pad_id,
    )
    copies = [tokenizer.decode(ids) for ids in outputs]
    exact = sum(c == s for c, s in zip(copies, test, strict=True))
    right = sum(
        a == b for c, s in zip(copies, test, strict=True) for a, b in zip(c, s, strict=False)
    )
    return {
        "step": read_meta(ckpt)["step"],
        "exact_match": exact / len(test),
        "symbol_accuracy": right / sum(len(s) for s in test),
        "examples": [[s, c] for s, c in zip(test[:5], copies[:5], strict=True)],
    }
