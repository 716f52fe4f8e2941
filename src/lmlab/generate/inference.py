"""Weights laid out for generation: the same values, fewer and faster matmuls.

Decoding runs the whole model for one new token per row, so on a CPU each step is dozens
of small matrix products whose fixed costs add up. Two layouts help, both undone when
generation ends (also on error), both memory-neutral, neither changing a value:

- `fused_projections`: a LLaMA layer's q, k and v weights become row blocks of one
  stacked matrix (gate and up likewise), so one matmul computes all three and q and k
  rotate together (`Attention.fused_qkv`, `MLP.fused_gate_up`). The nn.Linear weights
  become views into the stacked matrix meanwhile, so nothing is held twice. Layers
  wrapped by LoRA or quantized are left as they are.
- `column_major_linears`: on the CPU, MKL multiplies by an (out, in) weight faster when it
  is stored column-major, i.e. as the transpose of an (in, out) contiguous matrix. With
  several rows per step about twice as fast (8 rows x 384 -> 8192: 0.70 ms row-major, 0.32
  ms column-major). With one row it depends on the CPU: the same on the project's earlier
  VM, but 2.5x faster on its AMD EPYC one for a wide output layer (1 x 384 -> 8192: 1.09
  ms row-major, 0.44 ms column-major), so CPU weights are laid out column-major for any
  number of rows. A long prefill runs about the same either way.

Measured on this project's 2-core CPU, ~15M-parameter LLaMA, 256 new tokens: fused
projections +16% tokens/s at batch 1; column-major weights +20% at batch 8, and +23% at
batch 1 on the AMD EPYC VM
(benchmarks/generate_speed.py; BENCHMARKS.md). Tests compare every layout with the plain
model (tests/generate/test_inference.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lmlab.model.llama import MLP, Attention


@contextlib.contextmanager
def inference_weights(model: nn.Module, several_rows: bool) -> Iterator[None]:
    """Both layouts for a generation of one row (False) or several rows per step (True):
    column-major weights for several rows, and on the CPU for one row too."""
    param = next(model.parameters(), None)
    column_major = several_rows or (param is not None and param.device.type == "cpu")
    with contextlib.ExitStack() as stack:
        stack.enter_context(fused_projections(model, column_major=column_major))
        if column_major:
            stack.enter_context(column_major_linears(model))
        yield


@contextlib.contextmanager
def fused_projections(model: nn.Module, column_major: bool = False) -> Iterator[None]:
    """Stack each LLaMA layer's q/k/v and gate/up weights (see the module docstring)."""
    fused: list[tuple[nn.Module, str, tuple[nn.Linear, ...]]] = []
    # Ordinary tensors even when entered inside inference mode: the weights outlive it.
    no_inference = torch.inference_mode(False)
    try:
        for module in model.modules():
            if isinstance(module, Attention):
                name, parts = "fused_qkv", (module.q_proj, module.k_proj, module.v_proj)
            elif isinstance(module, MLP):
                name, parts = "fused_gate_up", (module.gate_proj, module.up_proj)
            else:
                continue
            if not all(type(p) is nn.Linear for p in parts):
                continue  # LoRA-wrapped or quantized: its own forward
            with no_inference, torch.no_grad():
                weight = torch.cat([p.weight for p in parts])  # (sum of outs, in)
                if column_major:
                    weight = weight.t().contiguous().t()
                bias = None
                if parts[0].bias is not None:
                    bias = torch.cat([p.bias for p in parts])
            fused.append((module, name, parts))
            start = 0
            for p in parts:  # each nn.Linear now reads its rows of the stacked matrix
                rows = p.weight.size(0)
                p.weight.data = weight[start : start + rows]
                if bias is not None:
                    p.bias.data = bias[start : start + rows]
                start += rows
            setattr(module, name, (weight, bias))
        yield
    finally:
        with no_inference:
            for module, name, parts in fused:
                setattr(module, name, None)
                for p in parts:  # their own storage again
                    p.weight.data = p.weight.data.clone(memory_format=torch.contiguous_format)
                    if p.bias is not None:
                        p.bias.data = p.bias.data.clone()


@contextlib.contextmanager
def column_major_linears(model: nn.Module) -> Iterator[None]:
    """Store every contiguous nn.Linear weight of a CPU model column-major inside the block,
    row-major again after it (see the module docstring)."""
    weights = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(module) is nn.Linear and w.device.type == "cpu" and w.is_contiguous():
            weights[id(w)] = w  # a tied weight once
    with torch.inference_mode(False):  # as in fused_projections
        for w in weights.values():
            w.data = w.data.t().contiguous().t()  # (out, in) view of an (in, out) matrix
    try:
        yield
    finally:
        with torch.inference_mode(False):
            for w in weights.values():
                w.data = w.data.contiguous()
