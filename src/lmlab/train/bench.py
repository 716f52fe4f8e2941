"""`lmlab bench`: training-step speed of a preset on this machine, as JSON.

Runs warm-up steps (compilation, allocator, autotuning), then times `--steps` full
training steps (forward, backward, AdamW) on random tokens, synchronising the device only
around the timed block. MFU uses the device's dense peak when it is known (else null),
and the model's own `flops_per_token`: for an MoE, the FLOPs of its active weights (the
k experts a token uses, and the router), not of every expert it holds.

With `--nproc K` (or under torchrun) every process runs the step under `--strategy`,
exactly as the trainer sets it up and steps it (`lmlab.train.setup`); rank 0 prints the
job's tokens/s and the largest peak memory of any process.
"""

from __future__ import annotations

import itertools
import platform
import time

import torch

from lmlab.config import build_config
from lmlab.model.build import build_model
from lmlab.model.lora import apply_lora, trainable_parameters
from lmlab.model.quant import quantize_base
from lmlab.runs.device import (
    current_memory,
    peak_flops,
    peak_memory,
    precision_name,
    synchronize,
)
from lmlab.runs.load import lora_config
from lmlab.runs.provenance import source_commit
from lmlab.train.distributed import runtime
from lmlab.train.setup import build_engine, train_step


def bench(
    preset: str,
    *,
    seq_len: int | None,
    micro_batch: int | None,
    compile: bool,
    steps: int,
    warmup: int,
    device: str = "auto",
    precision: str = "auto",
    strategy: str = "ddp",
    activation_checkpointing: str = "none",
    overrides: list[str] = (),
) -> dict | None:
    """Measure steady-state training speed and peak memory of one preset.

    Returns the result on rank 0 (None on other ranks of a multi-process run).
    """
    cfg = build_config(
        preset,
        overrides=[
            *overrides,
            f"train.strategy={strategy}",
            f"train.activation_checkpointing={activation_checkpointing}",
            f"train.compile={str(compile).lower()}",
            f"train.precision={precision}",
        ],
    )
    env, torch_device = runtime.init(device)
    try:
        return _bench(cfg, env, torch_device, preset, seq_len, micro_batch, steps, warmup)
    finally:
        runtime.shutdown()


def _model(cfg):
    """The model to time: plain (full training), or LoRA adapters on a frozen base (in NF4
    for qlora)."""
    model = build_model(cfg.model)
    if cfg.finetune.method in ("lora", "qlora"):
        apply_lora(model, lora_config(cfg))
    if cfg.finetune.method == "qlora":
        quantize_base(model)
    return model


def _bench(cfg, env, torch_device, preset, seq_len, micro_batch, steps, warmup):
    t = cfg.train
    seq_len = seq_len or cfg.seq_len
    micro_batch = micro_batch or t.micro_batch_size
    if seq_len > cfg.model.context_length:
        cfg.model.context_length = seq_len
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    engine = build_engine(cfg, env, torch_device, lambda: _model(cfg))  # the trainer's set-up
    amp_dtype = engine.amp_dtype
    params, flops = engine.model.num_params(), engine.model.flops_per_token(seq_len)
    # An MoE computes with k of its experts per token: FLOPs (and so MFU) count those only.
    active_params = getattr(engine.model, "num_active_params", engine.model.num_params)()
    generator = torch.Generator().manual_seed(env.rank)
    data = torch.randint(
        0, cfg.model.vocab_size, (4, micro_batch, seq_len + 1), generator=generator
    )
    batches = itertools.cycle([(batch[:, :-1], batch[:, 1:]) for batch in data])

    def step(i: int) -> None:  # the trainer's own step, one micro-batch per step
        train_step(engine, lambda: next(batches), accum=1, lr=t.lr, grad_clip=t.grad_clip)

    warm_started = time.perf_counter()
    for i in range(warmup):
        step(i)
    synchronize(torch_device)
    warmup_s = time.perf_counter() - warm_started
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize(torch_device)
    step_s = (time.perf_counter() - started) / steps
    step_s = runtime.max_across_ranks(step_s, env, torch_device)  # the slowest rank sets the pace
    tokens_per_s = micro_batch * seq_len * env.world_size / step_s
    peak = peak_flops(torch_device)
    peak_bytes, measure = peak_memory(torch_device)
    after_steps_bytes = current_memory(torch_device)  # steady state, without set-up's peak
    if peak_bytes is not None:
        peak_bytes = runtime.max_across_ranks(peak_bytes, env, torch_device)
    if not env.is_main:
        return None
    return {
        "benchmark": "lmlab bench",
        "device": torch.cuda.get_device_name(torch_device)
        if torch_device.type == "cuda"
        else f"{torch_device.type} ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "commit": source_commit(),
        "preset": preset,
        "params": params,
        "active_params": active_params,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "world_size": env.world_size,
        "strategy": t.strategy if env.enabled else "single",
        "activation_checkpointing": t.activation_checkpointing,
        "precision": precision_name(amp_dtype),
        "compile": t.compile,
        "method": cfg.finetune.method,
        "trainable_params": trainable_parameters(engine.model),
        "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "steps": steps,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "peak_flops": peak,
        "mfu": flops * tokens_per_s / (peak * env.world_size) if peak else None,
        "peak_memory_bytes": peak_bytes,
        "memory_after_steps_bytes": after_steps_bytes,
        "memory_measure": measure + (" (largest of the processes)" if env.enabled else ""),
        "cpu_threads": torch.get_num_threads() if torch_device.type == "cpu" else None,
        "cpu_threads_note": engine.threads_note or None,
    }
