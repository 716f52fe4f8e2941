"""Device, precision and peak-FLOPs facts the trainer needs."""

from __future__ import annotations

import contextlib

import torch

from lmlab.errors import UserError

# Dense (no sparsity) bf16/fp16 tensor-core peak in FLOP/s, by a substring of the CUDA
# device name. Unknown devices get no MFU at all rather than a wrong one.
PEAK_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "SXM"), 989e12),
    (("H100", "HBM3"), 989e12),  # the SXM part reports itself as "H100 80GB HBM3"
    (("H100", "PCIe"), 756e12),
    (("H200",), 989e12),
    (("H20",), 148e12),
    (("A100",), 312e12),
    (("L4",), 121e12),
    (("T4",), 65e12),
    (("V100",), 125e12),
]


def select_device(spec: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {spec!r} asked for, but CUDA is not available here: use --device cpu or auto"
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("device 'mps' asked for, but MPS is not available here")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None  # CPU bf16 autocast is slower than fp32 on most laptops
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise UserError("fp16 training needs a GPU; use precision bf16 or fp32 on CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """ "fp32", "bf16" or "fp16" for an autocast dtype from `autocast_dtype`."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU, else None (so MFU prints as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for needles, flops in PEAK_FLOPS:
        if all(n in name for n in needles):
            return flops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what was measured): the most memory this process has held on `device` so far.

    On CUDA, torch's peak allocation; elsewhere the process's peak resident set, which also
    counts the interpreter and torch's libraries (a few hundred MB); None on Windows.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "not measured on this system"
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process peak RSS"


def current_memory(device: torch.device) -> int | None:
    """Memory this process holds on `device` now: torch's allocation on CUDA, the resident
    set on Linux (None where neither can be read)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
