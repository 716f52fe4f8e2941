"""AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights of linear layers; not norms, biases or embedding tables.

    Embeddings are looked up, not multiplied, so decay only shrinks rare tokens' rows.
    A tied embedding doubles as the output layer; it follows the embedding rule.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # each shared parameter appears once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw_options(cfg: TrainConfig, device: torch.device) -> dict:
    """AdamW's settings; the fused CUDA kernel on GPUs, the foreach implementation elsewhere."""
    fused = device.type == "cuda"
    return {
        "lr": cfg.lr,
        "betas": (cfg.beta1, cfg.beta2),
        "eps": cfg.adam_eps,
        "fused": fused,
        "foreach": None if fused else True,
    }


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the decay / no-decay groups of `model`."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw_options(cfg, device))
