"""`lmlab quickstart`: teach a small LLaMA the FLOWROLL language on a CPU, in minutes.

Every step of a real project, end to end and offline:

1. generate FLOWROLL programs with their results (a language no pretrained model knows);
2. train a byte-level BPE tokenizer on them and write token shards;
3. train a small LLaMA from scratch;
4. score exact match on held-out test programs (never seen in training) before and after,
   by prompting `PROGRAM =>` and comparing the greedy completion with the interpreter.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmlab.config import build_config
from lmlab.data.dsl import (
    evaluate,
    format_line,
    format_prompt,
    generate_corpus,
    get_language,
    split_line,
)
from lmlab.data.prepare import prepare, summary_lines
from lmlab.data.tokenizer import TextTokenizer
from lmlab.generate.text import generate_text
from lmlab.model.build import build_model
from lmlab.runs.load import build_from_checkpoint
from lmlab.train.loop import train

LANGUAGE = "flowroll"
DIFFICULTY = "1-2"


def score(
    model, tokenizer: TextTokenizer, programs: list[str], max_new_tokens: int = 24
) -> tuple[dict, list[str]]:
    """Greedy completions of `PROGRAM =>` for each program, scored by the interpreter."""
    lines = []
    for program in programs:
        completion = "".join(
            generate_text(
                model,
                tokenizer,
                format_prompt(program),
                max_new_tokens=max_new_tokens,
                temperature=0.0,
            )
        )
        lines.append(format_line(program, completion.strip()))
    return evaluate(LANGUAGE, lines), lines


def run_quickstart(
    out_dir: str | Path = "quickstart",
    *,
    programs: int = 30_000,
    steps: int | None = None,
    test_programs: int = 200,
    seed: int = 0,
    log=print,
) -> dict:
    """Run the whole quickstart; returns the numbers it printed."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data_dir = out_dir / "data"

    log(
        f"1/4 generating {programs:,} FLOWROLL programs (difficulty {DIFFICULTY}), training a BPE tokenizer, writing shards"
    )
    manifest = prepare(
        [f"dsl:{LANGUAGE}:{programs}:{DIFFICULTY}"],
        data_dir,
        "bpe:512",
        seed=seed,
        overwrite=True,
        log=lambda *_: None,
    )
    for line in summary_lines(manifest):
        log(f"    {line}")

    overrides = [
        f"data.path={data_dir}",
        f"logging.runs_dir={out_dir / 'runs'}",
        "logging.tensorboard=false",
        f"train.seed={seed + 1337}",
    ]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    cfg = build_config("quickstart", overrides=overrides)
    test = [
        split_line(line)[0]
        for line in generate_corpus(
            get_language(LANGUAGE), test_programs, seed=seed, difficulty=DIFFICULTY, split="test"
        )
    ]

    log(f"2/4 scoring the untrained model on {len(test)} held-out test programs")
    from lmlab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(cfg.train.seed)  # the same initialisation training starts from
    untrained = build_model(cfg.model).eval()
    before, _ = score(untrained, tokenizer, test)

    log(
        f"3/4 training {cfg.model.family} ({untrained.num_params():,} params) for {cfg.train.max_steps} steps on CPU"
    )
    result = train(
        cfg, log=lambda msg, end="\n": log("    " + msg.strip()) if msg.strip() else None
    )
    evals = [r for r in result.history if "val_loss" in r]

    log("4/4 scoring the trained model on the same held-out programs")
    model, tokenizer, _, ckpt = build_from_checkpoint(result.run_dir, "cpu")
    after, lines = score(model, tokenizer, test)

    elapsed = time.perf_counter() - started
    summary = {
        "val_loss_start": evals[0]["val_loss"],
        "val_loss_end": evals[-1]["val_loss"],
        "exact_match_before": before["overall"]["exact_match"],
        "exact_match_after": after["overall"]["exact_match"],
        "valid_before": before["overall"]["valid_fraction"],
        "valid_after": after["overall"]["valid_fraction"],
        "by_difficulty_after": {d: s["exact_match"] for d, s in after["by_difficulty"].items()},
        "elapsed_s": elapsed,
        "run_dir": str(result.run_dir),
        "checkpoint": str(ckpt),
        "data_dir": str(data_dir),
    }
    log("")
    log(
        f"val loss:     {summary['val_loss_start']:.3f} (untrained) -> {summary['val_loss_end']:.3f} (trained)"
    )
    log(
        f"exact match:  {summary['exact_match_before']:.1%} (untrained) -> {summary['exact_match_after']:.1%} (trained) on {len(test)} unseen programs"
    )
    for difficulty, em in summary["by_difficulty_after"].items():
        log(
            f"              difficulty {difficulty} ({after['by_difficulty'][difficulty]['count']} programs): {em:.1%}"
        )
    log("samples (program => model's answer, with the interpreter's verdict):")
    lang = get_language(LANGUAGE)
    for line in lines[:6]:
        program, answer = split_line(line)
        truth = lang.run(program)
        log(f"    {line:<50} {'ok' if answer == truth else 'expected ' + truth}")
    log("")
    log(f"data:       {data_dir}   (lmlab data inspect {data_dir})")
    log(f"run:        {result.run_dir}   (metrics.jsonl, config.yaml, checkpoints/)")
    log(f'try:        lmlab generate {result.run_dir} --prompt "{test[0]} =>" --temperature 0')
    log(f"done in {elapsed:.0f} s")
    return summary
