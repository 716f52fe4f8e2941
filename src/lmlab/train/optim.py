"""The optimizers: AdamW with weight decay on matrices only; or Muon for the matrices inside
the blocks beside AdamW for the rest (train.optimizer=muon)."""

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


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW | MuonAdamW:
    """AdamW over the decay / no-decay groups of `model`; with cfg.optimizer=muon, Muon
    for the blocks' matrices and AdamW for the rest."""
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg, device)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw_options(cfg, device))


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The hidden matrices: 2-D weights inside the transformer blocks (attention and MLP
    projections). Embeddings, the output head, norms and biases are not; Muon's
    orthogonalised update suits a matrix that maps one hidden space to another."""
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and name.split(".")[0] == "blocks"
    ]


class MuonAdamW:
    """torch.optim.Muon over the blocks' matrices and torch.optim.AdamW over every other
    parameter, stepped together. `param_groups` lists both optimizers' groups (the loop sets
    each group's lr); `optimizers` is what torch's distributed state-dict helpers take, so
    checkpoints hold both states keyed by parameter name. Muon's update is scaled to
    AdamW's RMS (adjust_lr_fn="match_rms_adamw"), so one lr and weight decay serve both."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device):
        matrices = muon_parameters(model)
        ids = {id(p) for p in matrices}
        rest = [
            {**g, "params": [p for p in g["params"] if id(p) not in ids]}
            for g in param_groups(model, cfg.weight_decay)
        ]
        self.muon = torch.optim.Muon(
            matrices,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        self.adamw = torch.optim.AdamW(
            [g for g in rest if g["params"]], **adamw_options(cfg, device)
        )
        self.optimizers = [self.muon, self.adamw]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def defaults(self) -> dict:
        return {}  # not a fused AdamW: the loop reads the skip flag on the host

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
