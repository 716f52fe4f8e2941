"""The optimizers: AdamW with weight decay on matrices only; or Muon for the matrices inside
the blocks beside AdamW for the rest (train.optimizer=muon)."""

from __future__ import annotations

import math

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


def orthogonalise(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: `g` with its singular values pushed towards 1
    (to roughly 0.5-1.5, which is all Muon needs). `g` is one matrix (m, n) or a stack of
    them (k, m, n), each orthogonalised on its own. In bf16 on a GPU, as torch.optim.Muon
    and the public speed-run code do; in fp32 elsewhere: a CPU without native bf16 matmuls
    runs bf16 about 10x slower (a 384 x 128 matrix: 18.6 ms vs 1.9 ms on the project's VM)."""
    a, b, c = coefficients
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    # a x + (b G + c G^2) x with G = x x^T; addmm / baddbmm do each product and sum at once.
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its options, state and checkpoints), stepped with `orthogonalise`
    so that the iteration runs in fp32 on a CPU. Per matrix: Nesterov momentum, the
    orthogonalised update, decoupled weight decay, the step scaled by `adjust_lr_fn`."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon here takes no closure")
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
            # The matrices of one shape are orthogonalised together, as one stack: the
            # same iteration for each, in a few batched matmuls rather than a few small
            # matmuls per matrix (the blocks repeat a handful of shapes). On the project's
            # CPU a Muon step of the 4x128 char model went from 40 to 29 ms (tests: the same
            # numbers).
            by_shape: dict[torch.Size, list[int]] = {}
            for i, u in enumerate(updates):
                by_shape.setdefault(u.shape, []).append(i)
            for indices in by_shape.values():
                stack = torch.stack([updates[i] for i in indices])
                ortho = orthogonalise(
                    stack, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                for i, update in zip(indices, ortho, strict=True):
                    p = params[i]
                    p.mul_(1 - lr * group["weight_decay"])
                    ratio = _lr_ratio(group["adjust_lr_fn"], p.shape)
                    p.add_(update.to(p.dtype), alpha=-lr * ratio)


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's step scaling: "match_rms_adamw" gives the update AdamW's RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    return 1.0


class MuonAdamW:
    """Muon over the blocks' matrices and torch.optim.AdamW over every other
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
        self.muon = Muon(
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
