"""`lmlab bench`: training-step speed of a preset on this machine, as JSON.

Runs warm-up steps (compilation, allocator, autotuning), then times `--steps` full
training steps (forward, backward, AdamW) on random tokens, synchronising the device only
around the timed block. MFU uses the device's dense peak when it is known (else null).
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
    select_device,
    synchronize,
)
from lmlab.train.optim import build_optimizer


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
    overrides: list[str] = (),
) -> dict:
    """Measure steady-state training speed and peak memory of one preset."""
    cfg = build_config(preset, overrides=list(overrides))
    t = cfg.train
    seq_len = seq_len or cfg.seq_len
    micro_batch = micro_batch or t.micro_batch_size
    if seq_len > cfg.model.context_length:
        cfg.model.context_length = seq_len
    torch_device = select_device(device)
    amp_dtype = autocast_dtype(torch_device, precision)
    if torch_device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(torch_device)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(torch_device)
    optimizer = build_optimizer(model, t, torch_device)
    step_model = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(
        0, cfg.model.vocab_size, (4, micro_batch, seq_len + 1), generator=generator
    ).to(torch_device)

    def step(i: int) -> None:
        batch = data[i % len(data)]
        with autocast(torch_device, amp_dtype):
            _, loss = step_model(batch[:, :-1], batch[:, 1:])
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
    tokens_per_s = micro_batch * seq_len / step_s
    peak = peak_flops(torch_device)
    flops = model.flops_per_token(seq_len)
    if torch_device.type == "cuda":
        memory = {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(torch_device),
            "memory_measure": "torch.cuda.max_memory_allocated",
        }
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        memory = {
            "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "memory_measure": "process peak RSS",
        }
    return {
        "benchmark": "lmlab bench",
        "device": torch.cuda.get_device_name(torch_device)
        if torch_device.type == "cuda"
        else f"{torch_device.type} ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "commit": source_commit(),
        "preset": preset,
        "params": model.num_params(),
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "precision": precision_name(amp_dtype),
        "compile": compile,
        "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "steps": steps,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "peak_flops": peak,
        "mfu": flops * tokens_per_s / peak if peak else None,
        **memory,
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
        epilog="examples:\n  lmlab bench --preset tiny --steps 10\n  lmlab bench --preset gpt2-124m --seq-len 1024 --micro-batch 16 --compile",
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
    args = parser.parse_args(argv)
    for name in ("seq_len", "micro_batch", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    result = bench(
        args.preset,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        compile=args.compile,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        precision=args.precision,
        overrides=args.overrides,
    )
    print(json.dumps(result, indent=2))
    return 0
