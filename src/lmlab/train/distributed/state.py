"""Full, unsharded training state for checkpoints, whatever the strategy and world size.

A checkpoint always holds the whole model and the whole AdamW state keyed by parameter
name (the format of `torch.distributed.checkpoint.state_dict` with full_state_dict=True),
so one saved by 4 FSDP ranks resumes in 1 process, under DDP or ZeRO-1, and back.
Gathering runs on every rank (it is a collective under fsdp and zero1); the result is
complete on rank 0, which alone writes it.

This gather-to-rank-0 path suits lmlab's sizes (up to ~1.4B parameters: ~17 GB of fp32
weights and AdamW moments in rank 0's host memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from lmlab.train.distributed.runtime import Dist

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Prefixes the wrappers of parallelize.py add to parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (a tied output head): saved once."""
    seen: set[int] = set()
    duplicates = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.add(name)
        seen.add(id(param))
    return duplicates


def full_weights(model: nn.Module, drop: set[str]) -> dict[str, torch.Tensor]:
    """Every weight, unsharded, on the CPU (complete on rank 0; collective under fsdp)."""
    weights = get_model_state_dict(model, options=_GATHER)
    return {name: t.contiguous() for name, t in weights.items() if name not in drop}


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _torch_optimizers(optimizer: Any) -> Any:
    """What torch's state-dict helpers take: the optimizer, or the list a combined one
    (train.optim.MuonAdamW) holds."""
    return getattr(optimizer, "optimizers", optimizer)


def _param_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own (integer index) order."""
    names = {id(p): _clean(n) for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_name(state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """An integer-indexed optimizer state dict re-keyed by parameter name."""
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def _by_index(state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: s for name, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, env: Dist
) -> dict[str, Any] | None:
    """AdamW's whole state keyed by parameter name (on rank 0; None or partial elsewhere)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return (
            _by_name(optimizer.state_dict(), _param_order(model, optimizer))
            if env.is_main
            else None
        )
    return get_optimizer_state_dict(model, _torch_optimizers(optimizer), options=_GATHER)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a full optimizer state (by name, or by index as older checkpoints hold it) into
    this rank's optimizer, sharding it as the strategy needs."""
    order = _param_order(model, optimizer)
    if state["state"] and isinstance(next(iter(state["state"])), int):
        state = _by_name(state, order)
    # The implementation (fused / foreach) belongs to this machine, not to the checkpoint.
    implementation = [
        {k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups
    ]
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.load_state_dict(_by_index(state, order))
    else:
        set_optimizer_state_dict(
            model,
            _torch_optimizers(optimizer),
            state,
            options=StateDictOptions(full_state_dict=True),
        )
    for group, impl in zip(optimizer.param_groups, implementation, strict=True):
        group.update(impl)
