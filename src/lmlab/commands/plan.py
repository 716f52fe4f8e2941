"""`lmlab plan`: estimate a training run before starting it, or compare with an API bill."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmlab.config import (
    ACTIVATION_CHECKPOINTING,
    FINETUNE_METHODS,
    OPTIMIZERS,
    STRATEGIES,
    TRAINING_DTYPES,
)
from lmlab.errors import UserError
from lmlab.estimate.api import api_comparison, load_prices
from lmlab.estimate.hardware import load_hardware
from lmlab.estimate.plan import GIB, impossible_reason, llama_shape_for, make_plan
from lmlab.model.config import ModelConfig
from lmlab.model.presets import MODEL_PRESETS, get_model_preset
from lmlab.recipes import GPU_RECIPES, RECIPES, is_finetune_recipe

EXAMPLES = """\
examples:
  lmlab plan --preset llama-1.36b --tokens 6e9 --hardware 4xH20
  lmlab plan --preset llama-134m-rtx4090      # a GPU recipe: its card, micro-batch and tokens
  lmlab plan --preset gpt2-124m --budget-hours 2 --hardware a100-80gb
  lmlab plan --params 350e6 --budget-usd 500 --hardware 8xh100 --json
  lmlab plan --preset small --tokens 50e6 --hardware cpu-laptop --seq-len 256
  lmlab plan --preset llama-1.36b --tokens 1e8 --hardware rtx4090 --method qlora --lora-rank 16
  lmlab plan api --tokens-in 2e9 --tokens-out 5e8 --preset gpt2-124m --hardware h100
"""


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a positive finite number: {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help=f"model preset ({', '.join(MODEL_PRESETS)}) or training recipe (`lmlab config "
        "show`); a GPU recipe such as llama-134m-rtx4090 brings its card, micro-batch, "
        "sequence length and tokens",
    )
    p.add_argument("--params", type=_number, help="about N parameters (a LLaMA shape)")
    p.add_argument("--vocab-size", type=int, default=32000, help="with --params (32000)")
    p.add_argument("--hardware", help="e.g. h100, 4xH20 (default 1xh100, or the recipe's card)")
    p.add_argument("--hardware-file", help="YAML with your own hardware and prices")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak reached (0.4)")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU pass (8, or the recipe's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (model context)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    p.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, default="none")
    p.add_argument("--precision", choices=TRAINING_DTYPES, help="(the hardware's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _model(args: argparse.Namespace) -> ModelConfig:
    """The model of --preset / --params. A training recipe also fills the options it
    settles that were not given: its card, micro-batch and sequence length, and (GPU
    recipes) its tokens, steps x tokens per step."""
    if (args.preset is None) == (args.params is None):
        raise UserError("give exactly one of --preset NAME or --params N")
    if args.preset in RECIPES and not is_finetune_recipe(args.preset):
        from lmlab.config import build_config

        cfg = build_config(args.preset)
        if args.preset in GPU_RECIPES:
            args.hardware = args.hardware or GPU_RECIPES[args.preset][1]
            t = cfg.train
            if getattr(args, "tokens", None) is None and not _budget_given(args):
                args.tokens = float(t.max_steps * t.tokens_per_step)
                args.tokens_source = (
                    f"the recipe's {t.max_steps:,} steps x {t.tokens_per_step:,} tokens"
                )
        args.micro_batch = args.micro_batch or cfg.train.micro_batch_size
        args.seq_len = args.seq_len or cfg.model.context_length
        model = cfg.model
    elif args.preset is not None:
        model = get_model_preset(args.preset)
    else:
        model = llama_shape_for(args.params, args.vocab_size, args.seq_len or 2048)
    args.hardware = args.hardware or "1xh100"
    args.micro_batch = args.micro_batch or 8
    return model


def _budget_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("budget_hours", "budget_usd"))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:.1f} h ({hours / 24:.1f} days)"


def _trainable(plan: dict[str, Any]) -> str:
    s = plan["settings"]
    method = s.get("method", "full")
    trainable = plan.get("trainable_params", plan["params"])
    if method == "full":
        return f"{trainable:,} (full: every weight)"
    return (
        f"{trainable:,} ({trainable / plan['params']:.2%}; {method}, rank {s['lora_rank']} "
        "adapters on every projection)"
    )


def _active(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """A mixture of experts' active parameters: what FLOPs and time are counted on."""
    m, active = plan["model"], plan.get("active_params", plan["params"])
    if m["family"] != "moe":
        return []
    return [
        (
            "active parameters",
            f"{active:,} per token ({active / plan['params']:.1%}: "
            f"{m['n_expert_per_token']} of {m['n_expert']} experts per layer; FLOPs count these)",
        )
    ]


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as an aligned, human-readable table."""
    m, hw, s, opt = plan["model"], plan["hardware"], plan["settings"], plan["compute_optimal"]
    mem = plan["memory_per_gpu"]
    weights_kind = {"lora": "fp32 frozen", "qlora": "NF4 + fp32"}.get(s.get("method"), "fp32")
    rows = [
        ("model", f"{m['family']} {m['n_layer']}x{m['d_model']}, vocab {m['vocab_size']}"),
        ("parameters", f"{plan['params']:,} ({plan['non_embedding_params']:,} non-embedding)"),
        *_active(plan),
        ("trainable parameters", _trainable(plan)),
        ("FLOPs per token", f"{plan['flops_per_token']:.3e} (training, seq_len {s['seq_len']})"),
        ("tokens", f"{_si(plan['tokens'])} ({plan['tokens_source']})"),
        ("tokens per parameter", f"{plan['tokens_per_param']:.1f}"),
        ("training FLOPs", f"{plan['training_flops']:.3e}"),
        ("hardware", f"{hw['count']} x {hw['description']}"),
        (
            "settings",
            f"micro-batch {s['micro_batch']}, {s['precision']}, {s['strategy']}, "
            f"activation checkpointing {s['activation_checkpointing']}, MFU {plan['mfu']:.0%}",
        ),
        ("memory per GPU", ""),
        (f"  weights ({weights_kind})", _gib(mem["weights_bytes"])),
        ("  gradients (fp32)", _gib(mem["gradients_bytes"])),
        (
            "  Muon + AdamW state" if s.get("optimizer") == "muon" else "  AdamW state",
            _gib(mem["optimizer_bytes"]),
        ),
        ("  activations", _gib(mem["activations_bytes"])),
        ("  logits / loss", _gib(mem["logits_bytes"])),
    ]
    if mem["recompute_bytes"]:
        rows.append(
            (
                "  recomputed block",
                f"{_gib(mem['recompute_bytes'])} (after the loss buffer is freed: the larger counts)",
            )
        )
    if mem["gathered_weights_bytes"]:
        rows.append(("  FSDP gathered block", _gib(mem["gathered_weights_bytes"])))
    if mem.get("dequantized_weight_bytes"):
        rows.append(("  dequantized weight", _gib(mem["dequantized_weight_bytes"])))
    rows += [
        ("  total", _gib(mem["total_bytes"])),
        (
            "fits",
            f"{'yes' if plan['fits'] else 'NO'} ({_gib(plan['memory_usable_bytes'])} usable of "
            f"{_gib(plan['memory_available_bytes'])}, 10% headroom)",
        ),
    ]
    if plan["hours"] is not None:
        rows.append(("time", _duration(plan["hours"])))
    if plan["cost_usd"] is not None:
        cost = plan["cost_usd"]
        rows.append(("cost", f"${cost:,.{2 if cost < 100 else 0}f} ({plan['cost_note']})"))
    rows += [
        ("predicted loss", f"{plan['predicted_loss']:.3f} (Chinchilla fit, indicative only)"),
        (
            "compute-optimal",
            f"{_si(opt['params'])} params on {_si(opt['tokens'])} tokens, loss "
            f"{opt['predicted_loss']:.3f} (20 tokens/param for the same FLOPs)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in plan["warnings"]]
    if not plan["fits"]:
        lines.append(f"does not fit: {impossible_reason(plan)}")
    return "\n".join(lines)


def _plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab plan",
        description="Estimate parameters, FLOPs, memory, time, cost and loss before training. "
        "Prices are examples; memory assumes lmlab's trainer (fp32 weights, AdamW, autocast).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument(
        "--method",
        choices=FINETUNE_METHODS,
        default="full",
        help="train every weight (full), LoRA adapters on a frozen fp32 base (lora), or on a "
        "4-bit NF4 base (qlora); adapters on every projection",
    )
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank for lora/qlora (8)")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw (2 fp32 moments per weight) or muon (1 for the blocks' matrices)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=_number, help="training tokens (default 20 x params)")
    budget.add_argument("--budget-hours", type=_number, help="wall-clock hours to spend")
    budget.add_argument("--budget-usd", type=_number, help="dollars to spend (example prices)")
    args = p.parse_args(argv)
    model = _model(args)
    plan = make_plan(
        model,
        tokens=args.tokens,
        budget_hours=args.budget_hours,
        budget_usd=args.budget_usd,
        hardware=args.hardware,
        mfu=args.mfu,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        strategy=args.strategy,
        activation_checkpointing=args.activation_checkpointing,
        precision=args.precision,
        hardware_presets=load_hardware(args.hardware_file),
        method=args.method,
        lora_rank=args.lora_rank,
        optimizer=args.optimizer,
    )
    if getattr(args, "tokens_source", None):
        plan["tokens_source"] = args.tokens_source
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["fits"] else 1


def _api_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmlab plan api",
        description="Compare an API bill with training and serving a model yourself. The "
        "built-in API prices are an EXAMPLE; pass --prices FILE (YAML/JSON with "
        "input_usd_per_million and output_usd_per_million).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens-in", type=_number, required=True, help="prompt tokens to process")
    p.add_argument("--tokens-out", type=_number, required=True, help="tokens to generate")
    p.add_argument("--prices", help="YAML/JSON file with your API prices per million tokens")
    p.add_argument("--train-tokens", type=_number, help="training tokens (20 x params)")
    _add_model_args(p)
    args = p.parse_args(argv)
    if args.preset is None and args.params is None:
        args.preset = "gpt2-124m"
    model = _model(args)
    result = api_comparison(
        model,
        args.tokens_in,
        args.tokens_out,
        load_prices(args.prices),
        args.hardware,
        args.mfu,
        args.train_tokens,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    def usd(x: float | None) -> str:
        return "n/a (no peak FLOP/s or price)" if x is None else f"${x:,.2f}"

    print(
        f"API bill            {usd(result['api_cost_usd'])} ({result['api_prices'].get('note', args.prices)})"
    )
    print(
        f"train locally       {usd(result['train_cost_usd'])} ({_si(result['train_tokens'])} tokens)"
    )
    print(
        f"serve locally       {usd(result['serve_cost_usd'])} (2 FLOPs/param/token; decoding is usually slower)"
    )
    print(f"local total         {usd(result['local_cost_usd'])} ({result['hardware_price_note']})")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `lmlab plan` (and `lmlab plan api`)."""
    if argv and argv[0] == "api":
        return _api_main(argv[1:])
    return _plan_main(argv)
