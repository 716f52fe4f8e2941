"""Direct Preference Optimization (Rafailov et al., 2023), sigmoid loss.

For a prompt with a chosen and a rejected completion, and log-probabilities summed over
each completion's tokens under the policy (pi) and the frozen reference (ref):

    reward_chosen   = beta * (log pi(chosen) - log ref(chosen))
    reward_rejected = beta * (log pi(rejected) - log ref(rejected))
    loss            = -log sigmoid(reward_chosen - reward_rejected)

At the start the policy is the reference, both rewards are 0 and the loss is ln 2. The
reference is the starting model: with LoRA, the same network with its adapters switched
off (no second copy in memory); with full weights, a frozen copy of the base.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.finetune.data import IGNORE_INDEX, PreferenceLoader
from lmlab.model.lora import adapters_disabled, lora_modules
from lmlab.runs.device import autocast
from lmlab.train.setup import Engine

Reference = Callable[[], contextlib.AbstractContextManager[nn.Module]]


def sequence_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of log p(y_t | x_<=t) over the positions where y is not IGNORE_INDEX: (B,)."""
    logits = model(x)[0].float()  # (B, T, vocab)
    mask = y != IGNORE_INDEX
    targets = y.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean sigmoid DPO loss of a batch, and its rewards (detached)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    stats = {
        "reward_chosen": chosen_rewards.detach().mean(),
        "reward_rejected": rejected_rewards.detach().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).detach().mean(),
        "preference_accuracy": (chosen_rewards > rejected_rewards).float().detach().mean(),
    }
    return loss, stats


def reference_for(model: nn.Module, frozen_copy: Callable[[], nn.Module]) -> Reference:
    """How to compute reference log-probs: the adapters switched off when `model` has LoRA,
    else a frozen copy of the starting weights (made once, on first use)."""
    if lora_modules(model):
        return lambda: _in_eval(adapters_disabled(model))
    copy: list[nn.Module] = []

    @contextlib.contextmanager
    def frozen() -> Iterator[nn.Module]:
        if not copy:
            reference = frozen_copy().eval()
            for p in reference.parameters():
                p.requires_grad_(False)
            copy.append(reference)
        yield copy[0]

    return frozen


@contextlib.contextmanager
def _in_eval(context: contextlib.AbstractContextManager[nn.Module]) -> Iterator[nn.Module]:
    with context as model:  # no dropout in the reference
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


class DPOMetrics:
    """Rewards and accuracy averaged over the steps since the last read."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def read(self) -> dict[str, float]:
        out = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return out


def dpo_batch_loss(
    engine: Engine, batch, beta: float, reference: Reference, metrics: DPOMetrics | None
) -> torch.Tensor:
    """The DPO loss of one preference batch (chosen x, chosen y, rejected x, rejected y)."""
    cx, cy, rx, ry = batch
    x, y = torch.cat([cx, rx]), torch.cat([cy, ry])  # one forward for both sides
    n = cx.size(0)
    with torch.no_grad(), reference() as ref_model, autocast(engine.device, engine.amp_dtype):
        ref = sequence_logps(ref_model, x, y)
    with autocast(engine.device, engine.amp_dtype):
        policy = sequence_logps(engine.step_model, x, y)
    loss, stats = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)
    if metrics is not None:
        metrics.add(stats)
    return loss


@torch.no_grad()
def evaluate_dpo(
    engine: Engine,
    examples: list,
    micro_batch: int,
    seq_len: int,
    pad_id: int,
    beta: float,
    reference: Reference,
    max_batches: int = 0,
) -> dict[str, float]:
    """Validation DPO loss, rewards and preference accuracy over the pairs, in order."""
    loader = PreferenceLoader(
        examples, min(micro_batch, len(examples)), seq_len, pad_id, shuffle=False
    )
    batches = (
        loader.batches_per_epoch if max_batches <= 0 else min(max_batches, loader.batches_per_epoch)
    )
    model, was_training = engine.model, engine.model.training
    model.eval()
    metrics, losses = DPOMetrics(), []
    try:
        for _ in range(max(1, batches)):
            batch = [t.to(engine.device) for t in loader.next_batch()]
            losses.append(float(dpo_batch_loss(engine, batch, beta, reference, metrics)))
    finally:
        model.train(was_training)
    loss = sum(losses) / len(losses)
    stats = metrics.read()
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(min(loss, 700.0)),
        **{f"val_{k}": v for k, v in stats.items()},
    }
