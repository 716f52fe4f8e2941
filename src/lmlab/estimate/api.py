"""An API bill vs. training a model yourself and serving the same tokens (`lmlab plan api`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import UserError
from lmlab.estimate.hardware import parse_hardware_spec
from lmlab.estimate.plan import make_plan
from lmlab.model.config import ModelConfig

# Illustrative API prices, per million tokens. NOT a quote of any provider: pass --prices.
EXAMPLE_API_PRICES = {
    "input_usd_per_million": 0.50,
    "output_usd_per_million": 1.50,
    "note": "EXAMPLE prices, 2026-11, not any provider's; pass --prices FILE with yours",
}


def load_prices(path: str | None) -> dict[str, Any]:
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
