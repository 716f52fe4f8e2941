"""How a model is made to run faster or across processes: one function, one fixed order.

    1. activation checkpointing   each block (full) or each block's MLP (selective) is
                                  wrapped so its activations are recomputed in backward
    2. torch.compile              each block, in place (parameter names do not change)
    3. data parallelism           ddp / zero1: DistributedDataParallel (zero1 also shards
                                  AdamW's state with ZeroRedundancyOptimizer);
                                  fsdp: FSDP2 `fully_shard` on every block, then the root

The order matters: checkpointing wraps what compile sees, and both must be inside the
data-parallel wrapper so its hooks see the final modules. This is the same order
torchtitan uses.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from lmlab.config import ACTIVATION_CHECKPOINTING, TrainConfig
from lmlab.errors import UserError
from lmlab.train.distributed.runtime import Dist
from lmlab.train.optim import adamw_options, build_optimizer, param_groups


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute activations of each block ("full") or of each block's MLP ("selective")."""
    if mode == "none":
        return
    for i, block in enumerate(model.blocks):
        if mode == "full":
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
        elif mode == "selective":
            block.mlp = checkpoint_wrapper(block.mlp, preserve_rng_state=True)
        else:
            raise UserError(
                f"activation checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, not {mode!r}"
            )


def compile_cache_dir() -> Path:
    """Where torch.compile keeps what it compiled: TORCHINDUCTOR_CACHE_DIR if set, else
    lmlab's folder in the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lmlab" / "torch-compile"


def use_persistent_compile_cache() -> Path:
    """Point torch.compile's caches (Inductor's compiled kernels and graphs, AOTAutograd's
    forward/backward graphs) at `compile_cache_dir()`, which outlives a reboot; PyTorch's
    own default is a folder in /tmp. Only the first run of a model shape on a machine pays
    the full compile time (BENCHMARKS.md: cold vs warm); later runs load the result. The
    caches are keyed by the code, the shapes and the torch version, so a change recompiles
    rather than reusing something stale."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def parallelize(
    model: nn.Module,
    cfg: TrainConfig,
    env: Dist,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> nn.Module:
    """Apply checkpointing, compile and the strategy to `model` (in place where possible).

    Returns the module to call for training steps: a DDP wrapper for ddp/zero1, else `model`
    itself (fully_shard changes the model in place). Evaluation and checkpoints use `model`.
    """
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        use_persistent_compile_cache()
        for block in model.blocks:
            block.compile()
    if not env.enabled:
        return model
    if cfg.strategy in ("ddp", "zero1"):
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    if cfg.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if amp_dtype == torch.float16:
            raise UserError(
                "train.strategy=fsdp trains in bf16 or fp32: set train.precision=bf16 (fp16 needs a "
                "gradient scaler that FSDP2 does not provide)"
            )
        mesh = init_device_mesh(device.type, (env.world_size,))
        # Gather weights in the compute dtype, reduce gradients in fp32.
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    raise UserError(f"train.strategy must be ddp, zero1 or fsdp, not {cfg.strategy!r}")


def build_strategy_optimizer(
    model: nn.Module, cfg: TrainConfig, env: Dist, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW for the strategy: sharded across ranks (ZeroRedundancyOptimizer) under zero1.

    Build it after `parallelize`: under fsdp the parameters are the sharded ones.
    """
    if env.enabled and cfg.strategy == "zero1":
        return ZeroRedundancyOptimizer(
            param_groups(model, cfg.weight_decay),
            optimizer_class=torch.optim.AdamW,
            **adamw_options(cfg, device),
        )
    return build_optimizer(model, cfg, device)


def gradient_sync(step_model: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip DDP's all-reduce on micro-steps before the last of an accumulation.

    FSDP reduce-scatters every micro-step: keeping unsharded gradients around to skip it
    would cost the memory that FSDP is chosen to save.
    """
    if not sync and isinstance(step_model, DistributedDataParallel):
        return step_model.no_sync()
    return nullcontext()
