"""`lmlab config show`: presets and resolved configurations."""

from __future__ import annotations

import argparse

from lmlab.config import build_config, to_yaml
from lmlab.model.build import flops_per_token, param_count
from lmlab.model.presets import MODEL_PRESETS
from lmlab.recipes import RECIPE_DESCRIPTIONS, RECIPES, is_finetune_recipe


def preset_table() -> str:
    """Every preset with its architecture, parameter count and training FLOPs per token."""
    rows = [
        ("preset", "family", "layers x width", "heads", "context", "vocab", "params", "FLOPs/token")
    ]
    for name in [*(r for r in RECIPES if not is_finetune_recipe(r)), *MODEL_PRESETS]:
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
    lines += ["", "recipes:"] + [f"  {n}: {d}" for n, d in RECIPE_DESCRIPTIONS.items()]
    lines += ["", "Small presets' vocab (512) is replaced by the data's vocabulary when training."]
    return "\n".join(lines)


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
