"""LoRA (Hu et al., 2021): learn a low-rank update B @ A next to each frozen weight W.

A linear layer y = x W^T becomes y = x W^T + scaling * (x A^T) B^T, with A (rank, in) and
B (out, rank). B starts at zero, so a fresh adapter computes exactly the base model and
training starts from it; only A and B, rank * (in + out) numbers per layer, are trained.
scaling = alpha / rank keeps the update's size about the same when the rank changes
(rsLoRA, Kalajdzievski 2023, uses alpha / sqrt(rank), which suits large ranks better).

    cfg = LoRAConfig(rank=8, alpha=16)
    apply_lora(model, cfg)        # wraps the target nn.Linear modules in place, freezes the rest
    ...                           # train: only lora_A / lora_B require grad
    lora_state_dict(model)        # the adapter tensors alone (small)
    plain = merge_lora(model)     # W + scaling * B @ A: a plain model again

Parameter names follow the module tree: `blocks.0.attn.q_proj.weight` becomes
`blocks.0.attn.q_proj.base.weight`, next to `blocks.0.attn.q_proj.lora_A.weight` and
`...lora_B.weight`. `base_state_dict` gives the base weights under their original names,
so they compare with (and load from) an lmlab checkpoint.

Targets are module leaf names. Ours are also Hugging Face's, so a list of targets means
the same here as in PEFT's `target_modules` (lmlab.export.peft relies on it). The output
layer and the embeddings are never adapted, as in PEFT's "all-linear".
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.typed_dict import from_dict, suggest

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output layer

# Every attention and MLP projection of each family (GPT-2's c_proj names two modules:
# attn.c_proj and mlp.c_proj), in the order they appear in a block.
_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

# Never wrapped, whatever the targets say: the output layer may share its matrix with the
# token embedding, and adapting it is a different method (PEFT's modules_to_save).
_NEVER_ADAPTED = ("lm_head",)


def default_targets(family: str) -> tuple[str, ...]:
    """Every attention and MLP projection of a model family: all the names LoRA may target."""
    if family == "moe":
        raise UserError(
            "LoRA and QLoRA do not support moe (mixture-of-experts) models yet: use --method full"
        )
    if family not in _TARGETS:
        raise UserError(f"LoRA does not know model family {family!r}; known: {', '.join(_TARGETS)}")
    return _TARGETS[family]


@dataclass
class LoRAConfig:
    """Which linear layers get adapters, and how large and how strong the adapters are."""

    rank: int = 8
    """Rank r of the update B @ A; each adapted layer gains r * (in + out) parameters."""
    alpha: float = 16.0
    """Strength of the update: it is multiplied by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input, training only; the frozen base path is never dropped."""
    targets: tuple[str, ...] | list[str] = (ALL_LINEAR,)
    """Module leaf names to adapt (c_attn, q_proj, ...); "all-linear": every attention and MLP projection."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # a single name, as YAML or a CLI override may give it
            self.targets = (self.targets,)
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        self.validate()

    def validate(self) -> None:
        """Raise UserError, with a one-line message, for values that cannot make adapters."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise UserError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if (
            not isinstance(self.alpha, (int, float))
            or isinstance(self.alpha, bool)
            or not (math.isfinite(self.alpha) and self.alpha > 0)
        ):
            raise UserError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if (
            not isinstance(self.dropout, (int, float))
            or isinstance(self.dropout, bool)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise UserError(f"LoRA rslora must be true or false, got {self.rslora!r}")
        if (
            not isinstance(self.targets, tuple)
            or not self.targets
            or not all(isinstance(t, str) and t for t in self.targets)
        ):
            raise UserError(
                f"LoRA targets must be a non-empty list of module names (e.g. q_proj, v_proj) "
                f"or {ALL_LINEAR!r}, got {self.targets!r}"
            )

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / rank, or alpha / sqrt(rank) with rslora."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def resolve_targets(self, family: str) -> tuple[str, ...]:
        """The module names these targets select in a model of `family`, in block order."""
        known = default_targets(family)
        if ALL_LINEAR in self.targets:
            return known
        for name in self.targets:
            if name not in known:
                raise UserError(
                    f"LoRA target {name!r} is not a module of a {family} model"
                    f"{suggest(name, list(known))}; it has: {', '.join(known)} (or {ALL_LINEAR!r})"
                )
        return tuple(name for name in known if name in self.targets)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, ready for YAML or JSON (targets as a list)."""
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoRAConfig:
        """Build from a dict such as `to_dict()` wrote; unknown keys are UserErrors."""
        return from_dict(cls, d, "lora")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + B(A(dropout(x))) * scaling."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.enabled = True  # False: exactly the base layer (see adapters_disabled)
        # nn.Dropout(0) would still cost a kernel per call in training; PEFT skips it the same way.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)  # weight (rank, in)
        self.lora_B = nn.Linear(
            rank, base.out_features, bias=False, **factory
        )  # weight (out, rank)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default init (as PEFT does), B = 0: the update starts at exactly zero.

        A must not be zero as well: the gradient of B is scaling * (A x) * grad_y, and the
        gradient of A goes through B, so with both at zero neither would ever move.
        """
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if not self.enabled:
            return y
        h = self.lora_A(self.dropout(x))  # (..., rank): the bottleneck
        # y + scaling * h @ B^T in one fused op: a separate multiply and add would each make
        # and later backpropagate through another (..., out) tensor, as costly on a CPU as
        # the frozen weight's skipped gradient saves.
        out = torch.addmm(
            y.reshape(-1, y.size(-1)),
            h.reshape(-1, h.size(-1)),
            self.lora_B.weight.t(),
            alpha=self.scaling,
        )  # (N, out)
        return out.view(y.shape)

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, shape (out, in): one matrix that computes base + update."""
        weight = self.base.weight  # (out, in)
        # In fp32, so a bf16 model does not round the small update away before adding it.
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, rank) @ (rank, in)
        return (weight.float() + self.scaling * delta).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, enabled={self.enabled}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model` by module name (e.g. "blocks.0.attn.q_proj"), in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every target nn.Linear of `model` in a LoRALinear, in place, and freeze the rest.

    Returns the names of the wrapped modules. Afterwards only lora_A / lora_B weights
    require grad, so an optimizer over the parameters that require grad trains the adapters
    alone. Apply before wrapping the model (compile, DDP, FSDP): it changes the module tree.
    """
    cfg.validate()
    if lora_modules(model):
        raise UserError("the model already has LoRA adapters: apply LoRA once (merge_lora first)")
    targets = cfg.resolve_targets(model.config.family)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rpartition(".")[2] in targets
        and name not in _NEVER_ADAPTED
    ]
    if not chosen:
        raise UserError(f"LoRA targets {', '.join(targets)} match no linear layer of the model")
    for name, linear in chosen:
        parent, _, leaf = name.rpartition(".")
        adapter = LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
        # A new module starts in training mode; a model in eval mode must not get live dropout.
        adapter.train(linear.training)
        setattr(model.get_submodule(parent), leaf, adapter)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in lora_modules(model).values():
        module.lora_A.weight.requires_grad_(True)
        module.lora_B.weight.requires_grad_(True)
    return [name for name, _ in chosen]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, named as in model.state_dict() (`...q_proj.lora_A.weight`)."""
    return {
        f"{name}.{part}.weight": getattr(module, part).weight.detach()
        for name, module in lora_modules(model).items()
        for part in ("lora_A", "lora_B")
    }


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that has had apply_lora; every key and shape must match."""
    ours = lora_state_dict(model)
    if not ours:
        raise UserError("the model has no LoRA adapters: call apply_lora(model, cfg) first")
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        raise UserError(
            f"LoRA weights do not match the model's adapters: {len(missing)} missing "
            f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise UserError(
                f"LoRA weight {name} has shape {tuple(tensor.shape)} but the model needs "
                f"{tuple(ours[name].shape)}: another rank or another base model"
            )
    for name, tensor in state_dict.items():
        ours[name].copy_(tensor)  # detached views of the parameters: this writes into them


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights without adapters, under the names a plain model uses (no `.base`)."""
    adapted = lora_modules(model)
    weights = {}
    for key, tensor in model.state_dict().items():
        module, _, param = key.rpartition(".")  # "blocks.0.attn.q_proj.base", "weight"
        owner, _, part = module.rpartition(".")  # "blocks.0.attn.q_proj", "base"
        if owner in adapted:
            if part != "base":
                continue  # lora_A / lora_B
            key = f"{owner}.{param}"
        weights[key] = tensor
    return weights


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """A plain copy of `model` with each adapter folded in: W + scaling * B @ A.

    Same class, no LoRALinear modules, the original parameter names, every parameter
    trainable; `model` itself is unchanged. An adapter switched off contributes nothing, so
    the copy always computes what `model` computes now.
    """
    merged = copy.deepcopy(model)
    for name, module in lora_modules(merged).items():
        linear = module.base
        if module.enabled:
            linear.weight.copy_(module.merged_weight())
        parent, _, leaf = name.rpartition(".")
        setattr(merged.get_submodule(parent), leaf, linear)
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRALinear computes its base layer alone; restored afterwards.

    The base model for free: DPO's frozen reference model is this same network with its
    adapters off, so it needs no second copy of the weights.
    """
    modules = list(lora_modules(model).values())
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(modules, before, strict=True):
            m.enabled = enabled


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require grad (a shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
