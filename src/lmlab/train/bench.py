"""`lmlab bench`: training-step speed of a preset on this machine, as JSON.

Runs warm-up steps (compilation, allocator, autotuning), then times `--steps` full
training steps (forward, backward, AdamW) on random tokens, synchronising the device only
around the timed block. MFU uses the device's dense peak when it is known (else null).

With `--nproc K` (or under torchrun) every process runs the step under `--strategy`,
exactly as the trainer sets it up (`train.distributed.parallelize`); rank 0 prints the
job's tokens/s and the largest peak memory of any process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmlab.config import build_config
from lmlab.model.build import build_model
from lmlab.train.device import (
    autocast,
    autocast_dtype,
    peak_flops,
    precision_name,
    synchronize,
)
from lmlab.train.distributed import runtime
from lmlab.train.distributed.parallelize import build_strategy_optimizer, parallelize


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
        ],
    )
    env, torch_device = runtime.init(device)
    try:
        return _bench(
            cfg, env, torch_device, preset, seq_len, micro_batch, steps, warmup, precision
        )
    finally:
        runtime.shutdown()


def _bench(cfg, env, torch_device, preset, seq_len, micro_batch, steps, warmup, precision):
    t = cfg.train
    seq_len = seq_len or cfg.seq_len
    micro_batch = micro_batch or t.micro_batch_size
    if seq_len > cfg.model.context_length:
        cfg.model.context_length = seq_len
    amp_dtype = autocast_dtype(torch_device, precision)
    if torch_device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(torch_device)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(torch_device)
    params, flops = model.num_params(), model.flops_per_token(seq_len)
    step_model = parallelize(model, t, env, torch_device, amp_dtype)
    optimizer = build_strategy_optimizer(model, t, env, torch_device)
    generator = torch.Generator().manual_seed(env.rank)
    data = torch.randint(
        0, cfg.model.vocab_size, (4, micro_batch, seq_len + 1), generator=generator
    ).to(torch_device)

    def step(i: int) -> None:
        batch = data[i % len(data)]
        with autocast(torch_device, amp_dtype):
            loss = step_model(batch[:, :-1], batch[:, 1:])[1]  # the logits are not kept alive
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
    if torch_device.type == "cuda":
        peak_bytes, measure = (
            torch.cuda.max_memory_allocated(torch_device),
            "torch.cuda.max_memory_allocated",
        )
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        measure = "process peak RSS"
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
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "world_size": env.world_size,
        "strategy": t.strategy if env.enabled else "single",
        "activation_checkpointing": t.activation_checkpointing,
        "precision": precision_name(amp_dtype),
        "compile": t.compile,
        "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "steps": steps,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "peak_flops": peak,
        "mfu": flops * tokens_per_s / (peak * env.world_size) if peak else None,
        "peak_memory_bytes": peak_bytes,
        "memory_measure": measure + (" (largest of the processes)" if env.enabled else ""),
    }


def source_commit() -> str | None:
    """Short git commit of the lmlab source checkout, or None outside a checkout."""
    here = Path(__file__).resolve().parent  # the source checkout, wherever bench runs from
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab bench",
        description="Time training steps of a preset on random tokens; print tokens/s, step time, MFU and peak memory as JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmlab bench --preset tiny --steps 10\n"
        "  lmlab bench --preset gpt2-124m --seq-len 1024 --micro-batch 16 --compile\n"
        "  lmlab bench --preset llama-1.36b --nproc 2 --strategy fsdp --activation-checkpointing full",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides"
    )
    parser.add_argument("--preset", "-p", required=True)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="sequences per step (default: the preset's)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument(
        "--strategy",
        default="ddp",
        choices=("ddp", "zero1", "fsdp"),
        help="with several processes (default ddp)",
    )
    parser.add_argument(
        "--activation-checkpointing", default="none", choices=("none", "selective", "full")
    )
    parser.add_argument(
        "--nproc", type=int, default=None, metavar="K", help="run in K processes (starts torchrun)"
    )
    args = parser.parse_args(argv)
    for name in ("seq_len", "micro_batch", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.nproc is not None and args.nproc != 1:  # launch() refuses K < 1
        from lmlab.train.distributed.launch import launch

        return launch("bench", args.nproc, argv)
    result = bench(
        args.preset,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        compile=args.compile,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        precision=args.precision,
        strategy=args.strategy,
        activation_checkpointing=args.activation_checkpointing,
        overrides=args.overrides,
    )
    if result is not None:  # rank 0 reports for the job
        print(json.dumps(result, indent=2))
    return 0
