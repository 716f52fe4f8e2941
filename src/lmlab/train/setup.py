"""Set-up and the training step, shared by `lmlab train` and `lmlab bench`.

    build_engine   device settings -> seeded model -> (checkpoint weights) -> parallelize
                   (checkpointing, compile, strategy) -> the strategy's AdamW -> grad scaler
    train_step     one optimizer step: `accum` micro-batches of forward + backward (a
                   mixture of experts adds its routers' auxiliary loss), gradient clipping,
                   AdamW, zero_grad; a step whose loss or gradient norm is not finite
                   changes nothing (Engine.skipped says so, on the device)

Both live here so that the benchmark times exactly what the trainer runs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.config import Config
from lmlab.model.build import build_model
from lmlab.runs import cpu as cpu_load
from lmlab.runs.device import autocast, autocast_dtype
from lmlab.train.distributed.parallelize import (
    build_strategy_optimizer,
    gradient_sync,
    parallelize,
)
from lmlab.train.distributed.runtime import Dist
from lmlab.train.distributed.state import tied_duplicates

Batch = tuple[torch.Tensor, ...]  # (x, y), or more tensors for DPO's pairs


@dataclass
class Engine:
    """The model as the trainer drives it."""

    model: nn.Module
    """The plain model: evaluation and checkpoints use it (under fsdp its shards)."""
    step_model: nn.Module
    """What a training step calls: a DDP wrapper under ddp/zero1, else `model`."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    """Autocast dtype, None for plain fp32."""
    env: Dist
    tied: set[str]
    """Names of tied duplicate parameters, saved once in checkpoints."""
    threads_note: str = ""
    """On the CPU: the threads used, and why when fewer than the cores (for the start-up line)."""
    skipped: torch.Tensor | None = None
    """1.0 when the last step's loss or gradients were not finite and it changed nothing,
    else 0.0; a float on the device, so that reading it is the caller's choice of sync."""
    grad_norm: torch.Tensor | None = None
    """The last step's global gradient norm before clipping (on the device; None where it
    was not computed: fp16 without clipping)."""
    aux_loss: torch.Tensor | None = None
    """Mixture of experts only: the last step's auxiliary router loss as added to the loss
    (lmlab.model.moe; mean over micro-batches, on the device). None for dense models."""
    expert_load: torch.Tensor | None = None
    """Mixture of experts only: (n_layer, n_expert) share of the last step's routed tokens
    that each expert received (mean over micro-batches, on the device)."""


_DEFAULT_THREADS = torch.get_num_threads()  # one per core, or OMP_NUM_THREADS


def configure_device(
    cfg: Config, device: torch.device, env: Dist | None = None, cpu_threads: int = 0
) -> str:
    """Process-wide settings: CPU threads, TF32 matmuls on CUDA. Returns the threads note.

    CPU threads: train.cpu_threads, else `cpu_threads` (a resumed run's own count), else
    the cores other programs leave free (lmlab.runs.cpu), unless OMP_NUM_THREADS is set or
    several processes share the machine (the launcher shares the cores out)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type != "cpu":
        return ""
    threads = cfg.train.cpu_threads or cpu_threads
    busy = None
    if not threads:
        threads = _DEFAULT_THREADS
        shared = (env is not None and env.enabled) or "OMP_NUM_THREADS" in os.environ
        if not shared and cpu_load.enabled():
            busy = cpu_load.busy_cores_once()
            threads = cpu_load.auto_threads(_DEFAULT_THREADS, busy)
    torch.set_num_threads(threads)
    return cpu_load.describe(threads, _DEFAULT_THREADS, busy)


def build_engine(
    cfg: Config,
    env: Dist,
    device: torch.device,
    make_model: Callable[[], nn.Module] | None = None,
    cpu_threads: int = 0,
) -> Engine:
    """Build the model (`make_model`: initial or checkpoint weights; default a freshly
    initialised `cfg.model`), parallelize it, then the optimizer over the trainable
    parameters the strategy left (the sharded ones under fsdp). The seed is the same on
    every rank, so every replica starts identical."""
    threads_note = configure_device(cfg, device, env, cpu_threads)
    amp_dtype = autocast_dtype(device, cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = (make_model() if make_model else build_model(cfg.model)).to(device)
    tied = tied_duplicates(model)
    step_model = parallelize(model, cfg.train, env, device, amp_dtype)
    optimizer = build_strategy_optimizer(model, cfg.train, env, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Engine(model, step_model, optimizer, scaler, device, amp_dtype, env, tied, threads_note)


def train_step(
    engine: Engine,
    next_batch: Callable[[], Batch],
    accum: int,
    lr: float,
    grad_clip: float,
    loss_fn: Callable[[Batch], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches; returns the mean loss, on the device
    (reading it back would wait for the device, so the caller does that only to log).

    The loss of a batch (x, y) is the model's next-token loss over targets that are not
    -100, unless `loss_fn(batch)` says otherwise (DPO). A mixture of experts' routers add
    their auxiliary loss (of the micro-batch's last forward pass) to what is minimised,
    not to the loss returned: that stays the cross-entropy, comparable with val_loss."""
    e = engine
    for group in e.optimizer.param_groups:
        group["lr"] = lr
    moe = hasattr(e.model, "auxiliary_loss")
    loss_sum = torch.zeros((), device=e.device)
    aux_sum = torch.zeros((), device=e.device) if moe else None
    load_sum = None
    for micro_step in range(accum):
        batch = _to_device(next_batch(), e.device)
        with gradient_sync(e.step_model, sync=micro_step == accum - 1):
            with autocast(e.device, e.amp_dtype):
                # The logits are not kept alive through backward.
                loss = loss_fn(batch) if loss_fn else e.step_model(*batch)[1]
            if moe:  # dense models add nothing: no extra op on their step
                aux = e.model.auxiliary_loss()
                objective = loss + aux
            else:
                objective = loss
            e.scaler.scale(objective / accum).backward()
        loss_sum += loss.detach() / accum
        if moe:
            aux_sum += aux.detach() / accum
            load = e.model.routing.expert_load / accum
            load_sum = load if load_sum is None else load_sum + load
    e.aux_loss, e.expert_load = aux_sum, load_sum  # None for dense models
    bad = ~torch.isfinite(loss_sum)
    if e.scaler.is_enabled():  # fp16: the scaler skips steps with inf/NaN gradients itself
        norm = None
        optimizers = getattr(e.optimizer, "optimizers", [e.optimizer])  # Muon + AdamW: both
        if grad_clip > 0:
            for opt in optimizers:
                e.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(e.model.parameters(), grad_clip, foreach=True)
        for opt in optimizers:
            e.scaler.step(opt)
        e.scaler.update()
    else:
        norm = _grad_norm(e.model, grad_clip)
        bad = bad | ~torch.isfinite(norm)
        if e.env.enabled:  # the ranks' losses differ: every rank skips if one must
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        _optimizer_step_unless(e.optimizer, bad)
    e.optimizer.zero_grad(set_to_none=True)
    e.skipped, e.grad_norm = bad.float(), norm
    return loss_sum


def _grad_norm(model: nn.Module, grad_clip: float) -> torch.Tensor:
    """The global gradient norm, clipping to `grad_clip` when it is > 0 (a NaN norm leaves
    NaN gradients; that step is skipped)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    full_tensor = getattr(norm, "full_tensor", None)  # fsdp: a DTensor, replicated
    return full_tensor() if full_tensor is not None else norm


def _optimizer_step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """Step unless `bad` (a bool on the device). The fused AdamW (on GPUs) takes the flag as
    `found_inf` and skips on the device, without waiting for it; elsewhere the host reads
    the flag, which on the CPU costs nothing (CPU work is not queued)."""
    if isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
        optimizer.step()
    elif not bad.item():
        optimizer.step()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cuda":  # pinned host memory lets the copy overlap compute
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)
