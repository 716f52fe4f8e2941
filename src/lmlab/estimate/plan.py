"""`make_plan`: parameters, FLOPs, memory, fit, time, cost and loss of a training run.

Everything about the model comes from its own closed forms (`param_count`,
`flops_per_token` in lmlab.model.build); memory from lmlab.estimate.memory; the loss and
the compute-optimal comparison from lmlab.estimate.scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmlab.config import ACTIVATION_CHECKPOINTING, STRATEGIES
from lmlab.errors import UserError
from lmlab.estimate import scaling
from lmlab.estimate.hardware import Hardware, load_hardware, parse_hardware_spec
from lmlab.estimate.memory import trainable_params, training_memory
from lmlab.model.build import active_param_count, flops_per_token, param_count
from lmlab.model.config import ModelConfig

HEADROOM = 0.10
"""Fraction of device memory kept free for the allocator's fragmentation, CUDA context,
NCCL buffers and kernel workspaces: a plan fits if it needs at most 90% of the memory."""
GIB = 2**30


def _memory(cfg: ModelConfig, s: dict[str, Any]):
    return training_memory(
        cfg,
        s["micro_batch"],
        s["seq_len"],
        s["precision"],
        s["activation_checkpointing"],
        s["strategy"],
        s["count"],
        s.get("method", "full"),
        s.get("lora_rank", 8),
        s.get("optimizer", "adamw"),
    )


def _suggestions(cfg: ModelConfig, s: dict[str, Any], usable_bytes: float) -> list[str]:
    """Single changes that make the plan fit, in order of how little they cost.

    Each is re-evaluated with the memory model; only those that fit are listed. If no single
    change fits, the smallest GPU count that fits with everything else turned on is given.
    """

    def fits(**change: Any) -> bool:
        return _memory(cfg, {**s, **change}).total_bytes <= usable_bytes

    out = []
    mb = s["micro_batch"] // 2
    while mb >= 1 and not fits(micro_batch=mb):
        mb //= 2
    if mb >= 1:
        out.append(f"--micro-batch {mb} (gradient accumulation keeps the tokens per step)")
    for ac in ACTIVATION_CHECKPOINTING[1:]:  # the cheapest that fits
        if s["activation_checkpointing"] != ac and fits(activation_checkpointing=ac):
            out.append(f"--activation-checkpointing {ac}")
            break
    for strategy in STRATEGIES[1:]:  # those that shard something
        if s["strategy"] != strategy and fits(strategy=strategy):
            out.append(f"--strategy {strategy}")
            break
    for count in (2, 4, 8, 16, 32, 64, 128, 256):
        if count > s["count"] and fits(strategy="fsdp", count=count):
            out.append(f"--hardware {count}x{s['hardware']} --strategy fsdp")
            break
    if out:
        return out
    everything = dict(activation_checkpointing="full", micro_batch=1)
    if fits(**everything):
        return ["--activation-checkpointing full --micro-batch 1"]
    for count in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if count >= s["count"] and fits(count=count, strategy="fsdp", **everything):
            return [
                f"--hardware {count}x{s['hardware']} --strategy fsdp "
                "--activation-checkpointing full --micro-batch 1"
            ]
    return ["a smaller model or a shorter --seq-len: nothing up to 1024 devices fits"]


def make_plan(
    model_cfg: ModelConfig,
    tokens: float | None = None,
    budget_hours: float | None = None,
    budget_usd: float | None = None,
    hardware: str = "1xh100",
    mfu: float = 0.4,
    micro_batch: int = 8,
    seq_len: int | None = None,
    strategy: str = "ddp",
    activation_checkpointing: str = "none",
    precision: str | None = None,
    hardware_presets: dict[str, Hardware] | None = None,
    method: str = "full",
    lora_rank: int = 8,
    optimizer: str = "adamw",
) -> dict[str, Any]:
    """A plain dict (JSON-ready) describing the run; see docs/planning.md.

    Give at most one of tokens, budget_hours, budget_usd; with none, the compute-optimal
    20 tokens per parameter is assumed. precision defaults to the hardware's. method:
    "full", or "lora" / "qlora" with adapters of rank lora_rank on every projection (memory
    and trainable parameters change; FLOPs are counted as for full training).
    """
    if sum(x is not None for x in (tokens, budget_hours, budget_usd)) > 1:
        raise UserError("give only one of --tokens, --budget-hours, --budget-usd")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu is a fraction of peak in (0, 1], got {mfu}")
    presets = load_hardware() if hardware_presets is None else hardware_presets
    count, hw = parse_hardware_spec(hardware, presets)
    seq_len = model_cfg.context_length if seq_len is None else seq_len
    if seq_len > model_cfg.context_length:
        raise UserError(
            f"--seq-len {seq_len} is longer than the model's context_length "
            f"{model_cfg.context_length}"
        )
    precision = hw.precision if precision is None else precision

    n_params = param_count(model_cfg)
    n_non_embedding = param_count(model_cfg, exclude_embeddings=True)
    flops_token = flops_per_token(model_cfg, seq_len)
    cluster_flops_s = None if hw.peak_flops is None else count * hw.peak_flops * mfu
    price_hour = (
        None if hw.example_price_usd_per_hour is None else count * hw.example_price_usd_per_hour
    )

    if budget_usd is not None:
        if not price_hour:
            raise UserError(f"{hw.name} has no price; pass --budget-hours or --tokens instead")
        budget_hours = budget_usd / price_hour
    if budget_hours is not None:
        if cluster_flops_s is None:
            raise UserError(
                f"{hw.name} has no known peak FLOP/s, so a time budget cannot be turned into "
                "tokens; pass --tokens, or a --hardware-file with peak_flops"
            )
        tokens = budget_hours * 3600 * cluster_flops_s / flops_token
    tokens_source = "given"
    if tokens is None:
        tokens = scaling.TOKENS_PER_PARAM * n_params
        tokens_source = "compute-optimal default (20 tokens per parameter)"
    elif budget_hours is not None:
        tokens_source = "from budget"
    if tokens <= 0:
        raise UserError(f"tokens must be positive, got {tokens}")

    total_flops = flops_token * tokens
    settings = dict(
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        strategy=strategy,
        count=count,
        hardware=hw.name,
        method=method,
        lora_rank=lora_rank,
        optimizer=optimizer,
    )
    memory = _memory(model_cfg, settings)
    available_bytes = hw.memory_gib * GIB
    usable_bytes = available_bytes * (1 - HEADROOM)
    fits = memory.total_bytes <= usable_bytes

    hours = None if cluster_flops_s is None else total_flops / cluster_flops_s / 3600
    cost = None if hours is None or price_hour is None else hours * price_hour
    opt_n, opt_d = scaling.compute_optimal(total_flops)
    fit_n, fit_d = scaling.fit_optimal(total_flops)
    plan: dict[str, Any] = {
        "model": model_cfg.to_dict(),
        "params": n_params,
        "non_embedding_params": n_non_embedding,
        # What one token computes with: below params only for a mixture of experts, whose
        # memory holds every expert (params) while its FLOPs come from k of them.
        "active_params": active_param_count(model_cfg),
        "trainable_params": trainable_params(model_cfg, method, lora_rank),
        "flops_per_token": flops_token,
        "tokens": tokens,
        "tokens_source": tokens_source,
        "tokens_per_param": tokens / n_params,
        "training_flops": total_flops,
        "hardware": {**dataclasses.asdict(hw), "count": count},
        "settings": {k: v for k, v in settings.items() if k not in ("count", "hardware")},
        "mfu": mfu,
        "memory_per_gpu": memory.to_dict(),
        "memory_available_bytes": available_bytes,
        "memory_usable_bytes": usable_bytes,
        "fits": fits,
        "suggestions": [] if fits else _suggestions(model_cfg, settings, usable_bytes),
        "hours": hours,
        "cost_usd": cost,
        "cost_note": hw.price_note,
        "predicted_loss": scaling.predicted_loss(n_params, tokens),
        "compute_optimal": {
            "params": opt_n,
            "tokens": opt_d,
            "predicted_loss": scaling.predicted_loss(opt_n, opt_d),
            "fit_params": fit_n,
            "fit_tokens": fit_d,
            "fit_predicted_loss": scaling.predicted_loss(fit_n, fit_d),
        },
        "warnings": [],
    }
    if model_cfg.family == "moe":
        plan["warnings"].append(
            "the scaling-law numbers (predicted loss, compute-optimal, tokens per parameter) "
            "are fits to dense models: a mixture of experts' loss lies between a dense "
            "model's of its active and of its total parameters"
        )
    warning = scaling.tokens_per_param_warning(n_params, tokens)
    if warning:
        plan["warnings"].append(warning)
    if hours is None:
        plan["warnings"].append(
            f"{hw.name} has no known dense peak FLOP/s, so time and cost are not estimated; "
            "give peak_flops in a --hardware-file"
        )
    return plan


def largest_micro_batch(
    model_cfg: ModelConfig,
    hardware: str,
    seq_len: int | None = None,
    limit: int = 64,
    hardware_presets: dict[str, Hardware] | None = None,
) -> int:
    """The largest power-of-two micro-batch (up to `limit`) whose training memory fits one
    device of `hardware` in its own precision, with DDP and no activation checkpointing
    (0 if not even 1 fits). The GPU recipes' micro-batches are this function's answers."""
    presets = load_hardware() if hardware_presets is None else hardware_presets
    count, hw = parse_hardware_spec(hardware, presets)
    settings = dict(
        seq_len=model_cfg.context_length if seq_len is None else seq_len,
        precision=hw.precision,
        activation_checkpointing="none",
        strategy="ddp",
        count=count,
    )
    usable_bytes = hw.memory_gib * GIB * (1 - HEADROOM)
    best, micro = 0, 1
    while micro <= limit:
        if _memory(model_cfg, {**settings, "micro_batch": micro}).total_bytes > usable_bytes:
            break
        best, micro = micro, micro * 2
    return best


def impossible_reason(plan: dict[str, Any]) -> str:
    """One line: how much memory the plan needs, how much there is, and what to change."""
    need = plan["memory_per_gpu"]["total_bytes"] / GIB
    have = plan["memory_available_bytes"] / GIB
    fixes = " or ".join(plan["suggestions"])
    return (
        f"needs {need:.1f} GiB per GPU, {have:.0f} GiB available "
        f"({have * (1 - HEADROOM):.1f} GiB usable after 10% headroom): try {fixes}"
    )


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
