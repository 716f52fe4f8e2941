"""Pick the family: build a model, or price one (parameters, FLOPs) without building it."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from lmlab.model import gpt2, llama, moe
from lmlab.model.config import ModelConfig

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "gpt2": gpt2.GPT2,
    "llama": llama.Llama,
    "moe": moe.MoE,
}
_FAMILY_MODULES = {"gpt2": gpt2, "llama": llama, "moe": moe}


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> nn.Module:
    """A freshly initialized model of cfg's family, created directly on `device`.

    `device="meta"` allocates nothing: enough to count parameters of any size.
    """
    cfg.validate()
    with torch.device(device) if device is not None else nullcontext():
        return MODEL_CLASSES[cfg.family](cfg)


def param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Closed-form `num_params(exclude_embeddings)` of the model cfg describes."""
    cfg.validate()
    return _FAMILY_MODULES[cfg.family].param_count(cfg, exclude_embeddings)


def active_param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters one token's forward pass reads: all of them, except in a mixture of
    experts, where a token skips the experts it is not routed to."""
    if cfg.family == "moe":
        cfg.validate()
        return moe.active_param_count(cfg, exclude_embeddings)
    return param_count(cfg, exclude_embeddings)


def flops_per_token(cfg: ModelConfig, context_length: int | None = None) -> int:
    """Closed-form training FLOPs (forward + backward) per token; see gpt2.flops_per_token."""
    cfg.validate()
    return _FAMILY_MODULES[cfg.family].flops_per_token(cfg, context_length)
