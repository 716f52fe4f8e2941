"""`lmlab config show`: presets and resolved configurations."""

from __future__ import annotations

import argparse

from lmlab.config import build_config, to_yaml
from lmlab.model.build import flops_per_token, param_count
from lmlab.model.presets import MODEL_PRESETS
from lmlab.recipes import (
    GPU_CARDS,
    GPU_LADDER,
    GPU_RECIPES,
    RECIPE_DESCRIPTIONS,
    RECIPES,
    is_finetune_recipe,
)


def preset_table() -> str:
    """Every preset with its architecture, parameter count and training FLOPs per token."""
    rows = [
        ("preset", "family", "layers x width", "heads", "context", "vocab", "params", "FLOPs/token")
    ]
    own_rows = (r for r in RECIPES if not is_finetune_recipe(r) and r not in GPU_RECIPES)
    for name in [*own_rows, *MODEL_PRESETS]:
        m = build_config(name).model
        rows.append(
            (
                name,
                m.family,
                f"{m.n_layer} x {m.d_model}",
                f"{m.n_head}/{m.n_kv_head}",
                str(m.context_length),
                f"{m.vocab_size:,}",
                f"{param_count(m):,}",
                f"{flops_per_token(m):,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines += ["", "recipes:"] + [
        f"  {n}: {d}" for n, d in RECIPE_DESCRIPTIONS.items() if n not in GPU_RECIPES
    ]
    lines += ["", "Small presets' vocab (512) is replaced by the data's vocabulary when training."]
    return "\n".join(lines + ["", gpu_ladder_table()])


def gpu_ladder_table() -> str:
    """The GPU recipes: micro-batch x accumulation per model size and card."""
    rows = [("GPU recipes: PRESET-CARD", "tokens/step", "steps", "lr", *GPU_CARDS)]
    for preset, rung in GPU_LADDER.items():
        seqs = rung["tokens_per_step"] // build_config(preset).model.context_length
        rows.append(
            (
                preset,
                f"{rung['tokens_per_step']:,}",
                f"{rung['max_steps']:,}",
                f"{rung['lr']:g}",
                *(f"{m} x {seqs // m}" for m in rung["micro"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(
        lines
        + [
            "(micro-batch x accumulation on one card; e.g. lmlab train --preset "
            "llama-134m-rtx4090 --data DIR; lmlab plan --preset llama-134m-rtx4090 for its "
            "memory, time and cost)"
        ]
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab config", description="Show presets and resolved configurations."
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{show}")
    p = sub.add_parser(
        "show",
        help="list presets, or print one resolved config as YAML",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmlab config show\n  lmlab config show --preset tiny train.max_steps=500\n"
        "  lmlab config show --preset llama-1.36b > my_run.yaml",
    )
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    p.add_argument("--preset", "-p", default=None)
    p.add_argument("--config", "-c", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None and not args.overrides:
        print(preset_table())
        return 0
    cfg = build_config(args.preset, args.config, args.overrides)
    print(to_yaml(cfg), end="")
    print(
        f"# {param_count(cfg.model):,} parameters, {flops_per_token(cfg.model, cfg.seq_len):,} training FLOPs per token"
    )
    return 0
