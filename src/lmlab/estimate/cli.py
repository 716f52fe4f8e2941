"""`lmlab plan`: estimate a training run before starting it, or compare with an API bill."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import UserError
from lmlab.estimate.hardware import load_hardware, parse_hardware_spec
from lmlab.estimate.memory import CHECKPOINTING, STRATEGIES
from lmlab.estimate.plan import GIB, impossible_reason, make_plan
from lmlab.model.build import param_count
from lmlab.model.config import ModelConfig
from lmlab.model.presets import MODEL_PRESETS, get_model_preset

EXAMPLES = """\
examples:
  lmlab plan --preset llama-1.36b --tokens 6e9 --hardware 4xH20
  lmlab plan --preset gpt2-124m --budget-hours 2 --hardware a100-80gb
  lmlab plan --params 350e6 --budget-usd 500 --hardware 8xh100 --json
  lmlab plan --preset small --tokens 50e6 --hardware cpu-laptop --seq-len 256
  lmlab plan api --tokens-in 2e9 --tokens-out 5e8 --preset gpt2-124m --hardware h100
"""

# Illustrative API prices, per million tokens. NOT a quote of any provider: pass --prices.
EXAMPLE_API_PRICES = {
    "input_usd_per_million": 0.50,
    "output_usd_per_million": 1.50,
    "note": "EXAMPLE prices, 2026-11, not any provider's; pass --prices FILE with yours",
}


def llama_shape_for(n_params: float, vocab_size: int = 32000, context_length: int = 2048):
    """A LLaMA config with about n_params parameters.

    Keeps LLaMA's aspect ratio d_model ~= 128 * n_layer (LLaMA-7B: 4096 / 32; our
    llama-1.36b: 2304 / 18), d_model a multiple of 64, heads of 64 (128 from d_model 1024
    up), and picks the depth whose closed-form parameter count is nearest n_params.
    """
    if n_params <= 0:
        raise UserError(f"--params must be positive, got {n_params}")
    best = None
    for n_layer in range(1, 161):
        d_model = max(64, 64 * round(128 * n_layer / 64))
        head_dim = 128 if d_model >= 1024 else 64
        cfg = ModelConfig(
            family="llama",
            vocab_size=vocab_size,
            context_length=context_length,
            n_layer=n_layer,
            n_head=d_model // head_dim,
            d_model=d_model,
        )
        error = abs(param_count(cfg) - n_params)
        if best is None or error < best[0]:
            best = (error, cfg)
    return best[1]


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--params", type=_number, help="about N parameters (a LLaMA shape)")
    p.add_argument("--vocab-size", type=int, default=32000, help="with --params (32000)")
    p.add_argument("--hardware", default="1xh100", help="e.g. h100, 4xH20 (default 1xh100)")
    p.add_argument("--hardware-file", help="YAML with your own hardware and prices")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak reached (0.4)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU pass (8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (model context)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    p.add_argument("--activation-checkpointing", choices=CHECKPOINTING, default="none")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="(the hardware's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _model(args: argparse.Namespace) -> ModelConfig:
    if (args.preset is None) == (args.params is None):
        raise UserError("give exactly one of --preset NAME or --params N")
    if args.preset is not None:
        return get_model_preset(args.preset)
    return llama_shape_for(args.params, args.vocab_size, args.seq_len or 2048)


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


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as an aligned, human-readable table."""
    m, hw, s, opt = plan["model"], plan["hardware"], plan["settings"], plan["compute_optimal"]
    mem = plan["memory_per_gpu"]
    rows = [
        ("model", f"{m['family']} {m['n_layer']}x{m['d_model']}, vocab {m['vocab_size']}"),
        ("parameters", f"{plan['params']:,} ({plan['non_embedding_params']:,} non-embedding)"),
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
        ("  weights (fp32)", _gib(mem["weights_bytes"])),
        ("  gradients (fp32)", _gib(mem["gradients_bytes"])),
        ("  AdamW state", _gib(mem["optimizer_bytes"])),
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
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=_number, help="training tokens (default 20 x params)")
    budget.add_argument("--budget-hours", type=_number, help="wall-clock hours to spend")
    budget.add_argument("--budget-usd", type=_number, help="dollars to spend (example prices)")
    args = p.parse_args(argv)
    plan = make_plan(
        _model(args),
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
    )
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["fits"] else 1


def _load_prices(path: str | None) -> dict[str, Any]:
    if path is None:
        return EXAMPLE_API_PRICES
    try:
        data = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
    except OSError as e:
        raise UserError(f"cannot read prices file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"prices file {path} is not valid YAML/JSON: {e}") from None
    keys = ("input_usd_per_million", "output_usd_per_million")
    if not isinstance(data, dict) or any(not isinstance(data.get(k), (int, float)) for k in keys):
        raise UserError(f"prices file {path} needs numbers for {' and '.join(keys)}")
    return data


def api_comparison(
    model_cfg: ModelConfig,
    tokens_in: float,
    tokens_out: float,
    prices: dict[str, Any],
    hardware: str = "1xh100",
    mfu: float = 0.4,
    train_tokens: float | None = None,
) -> dict[str, Any]:
    """API bill for the tokens vs. training a model locally and serving the same tokens.

    Serving is priced as 2 FLOPs per parameter per token at the given MFU: optimistic for
    token-by-token decoding, which is limited by memory bandwidth, not FLOPs.
    """
    api = (
        tokens_in / 1e6 * prices["input_usd_per_million"]
        + tokens_out / 1e6 * prices["output_usd_per_million"]
    )
    plan = make_plan(model_cfg, tokens=train_tokens, hardware=hardware, mfu=mfu)
    count, hw = parse_hardware_spec(hardware)
    serve_hours = serve_cost = None
    if hw.peak_flops and hw.example_price_usd_per_hour is not None:
        serve_flops = 2 * plan["params"] * (tokens_in + tokens_out)
        serve_hours = serve_flops / (count * hw.peak_flops * mfu) / 3600
        serve_cost = serve_hours * count * hw.example_price_usd_per_hour
    local = (
        None if plan["cost_usd"] is None or serve_cost is None else plan["cost_usd"] + serve_cost
    )
    return {
        "api_cost_usd": api,
        "api_prices": prices,
        "train_cost_usd": plan["cost_usd"],
        "train_tokens": plan["tokens"],
        "serve_hours": serve_hours,
        "serve_cost_usd": serve_cost,
        "local_cost_usd": local,
        "hardware_price_note": hw.price_note,
    }


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
    result = api_comparison(
        _model(args),
        args.tokens_in,
        args.tokens_out,
        _load_prices(args.prices),
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
