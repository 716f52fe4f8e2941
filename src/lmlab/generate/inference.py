"""Weights laid out for generation: the same values, fewer and faster matmuls.

Decoding runs the whole model for one new token per row, so on a CPU each step is dozens
of small matrix products whose fixed costs add up. These layouts help, all undone when
generation ends (also on error), none changing a weight's value:

- `fused_projections`: a LLaMA layer's q, k and v weights become row blocks of one
  stacked matrix (gate and up likewise), so one matmul computes all three and q and k
  rotate together (`Attention.fused_qkv`, `MLP.fused_gate_up`). The nn.Linear weights
  become views into the stacked matrix meanwhile, so nothing is held twice. Layers
  wrapped by LoRA or quantized are left as they are.
- `column_major_linears`: on the CPU, MKL multiplies by an (out, in) weight faster when it
  is stored column-major, i.e. as the transpose of an (in, out) contiguous matrix (1 x 384
  -> 8192 on the project's AMD EPYC VM: 1.09 ms row-major, 0.44 ms column-major). Used
  where the two layouts below are not: a CPU model in another dtype than float32, or a
  single thread.
- `packed_linears`, for several rows per step of a float32 model on the CPU: every plain
  nn.Linear multiplies through oneDNN, its weight reordered into oneDNN's blocked layout
  (the kernels `torch.compile` uses for CPU inference). MKL ran these few-row products on
  one of the two cores (8 x 384 -> 8192: 2.09 ms with 2 threads, 2.41 ms with 1); oneDNN
  uses both (0.94 ms).
- `split_linears`, for one row per step, same conditions: each weight's output rows are
  cut into one block per thread, stored (threads, in, out / threads), and one batched
  product computes all blocks, a thread each (1 x 384 -> 8192 in one interleaved run:
  0.43 ms, against 0.62 ms for column-major MKL, which used one core, and as much for
  oneDNN).

These two release the dense weights meanwhile and rebuild them bit for bit afterwards,
so memory does not double; both stack LLaMA's projection groups first.

Measured with benchmarks/generate_speed.py (~15M parameters, 256 new tokens, 2 threads;
BENCHMARKS.md): fused projections +16% tokens/s at batch 1 (earlier VM); column-major
weights +20% at batch 8, and +23% at batch 1 on the AMD EPYC VM; there, packed weights
then took batch 8 from 526 to 790 tokens/s (LLaMA) and split weights batch 1 from 153 to
175 (LLaMA) and from 155 to 202 (GPT-2). Tests compare every layout with the plain model
(tests/generate/test_inference.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.llama import MLP, Attention
from lmlab.model.lora import LoRALinear


@contextlib.contextmanager
def inference_weights(model: nn.Module, several_rows: bool) -> Iterator[None]:
    """The layouts for a generation of one row (False) or several rows per step (True).

    A float32 model on the CPU: packed oneDNN weights for several rows, weights split per
    thread for one row (with 2+ threads). Otherwise stacked projections, column-major on
    the CPU and for several rows on other devices."""
    param = next(model.parameters(), None)
    cpu = param is not None and param.device.type == "cpu"
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if several_rows and cpu and onednn_linear_available(param.dtype):
            stack.enter_context(packed_linears(model))
        elif not several_rows and cpu and param.dtype == torch.float32 and threads > 1:
            stack.enter_context(split_linears(model, threads))
        else:
            column_major = several_rows or cpu
            stack.enter_context(fused_projections(model, column_major=column_major))
            if column_major:
                stack.enter_context(column_major_linears(model))
        yield


def _fusable(model: nn.Module) -> Iterator[tuple[nn.Module, str, tuple[nn.Linear, ...]]]:
    """(module, attribute, parts) for each LLaMA projection group whose parts are plain
    nn.Linear layers (LoRA-wrapped or quantized ones keep their own forward)."""
    for module in model.modules():
        if isinstance(module, Attention):
            name, parts = "fused_qkv", (module.q_proj, module.k_proj, module.v_proj)
        elif isinstance(module, MLP):
            name, parts = "fused_gate_up", (module.gate_proj, module.up_proj)
        else:
            continue
        if all(type(p) is nn.Linear for p in parts):
            yield module, name, parts


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias)


@contextlib.contextmanager
def fused_projections(model: nn.Module, column_major: bool = False) -> Iterator[None]:
    """Stack each LLaMA layer's q/k/v and gate/up weights (see the module docstring)."""
    fused: list[tuple[nn.Module, str, tuple[nn.Linear, ...]]] = []
    # Ordinary tensors even when entered inside inference mode: the weights outlive it.
    no_inference = torch.inference_mode(False)
    try:
        for module, name, parts in _fusable(model):
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
            setattr(module, name, functools.partial(_linear, weight, bias))
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


def onednn_linear_available(dtype: torch.dtype) -> bool:
    """Whether this torch build multiplies float32 by packed oneDNN weights (CPU builds
    with MKL-DNN, which are the usual x86 and ARM wheels)."""
    return (
        dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: nn.Module) -> Iterator[None]:
    """Multiply by packed oneDNN weights inside the block (see the module docstring)."""
    with _relaid_linears(
        model,
        lay_out=lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous()),
        multiply=_packed_linear,
        dense=lambda packed: packed.to_dense(),
    ):
        yield


def _split_linear(split: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    """x @ W^T (+ bias) with W's output rows in P blocks, split (P, in, out / P): one
    batched product whose P items run on P threads."""
    P, d_in, block = split.shape
    rows = x.reshape(-1, d_in)  # (N, in)
    y = torch.bmm(rows.expand(P, -1, -1), split)  # (P, N, out / P)
    y = y.transpose(0, 1).reshape(*x.shape[:-1], P * block)  # blocks side by side: (..., out)
    return y if bias is None else y + bias


def _split(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """(out, in) -> (P, in, out / P): block p holds output rows p*out/P .. (p+1)*out/P,
    transposed; one block (column-major, the same values) when out does not divide."""
    out, d_in = weight.shape
    parts = parts if out % parts == 0 else 1
    return weight.reshape(parts, out // parts, d_in).transpose(1, 2).contiguous()


def _unsplit(split: torch.Tensor) -> torch.Tensor:
    parts, d_in, block = split.shape
    return split.transpose(1, 2).reshape(parts * block, d_in)


@contextlib.contextmanager
def split_linears(model: nn.Module, parts: int) -> Iterator[None]:
    """Multiply by weights split into `parts` blocks of output rows inside the block (see
    the module docstring)."""
    with _relaid_linears(
        model, lay_out=lambda w: _split(w, parts), multiply=_split_linear, dense=_unsplit
    ):
        yield


@contextlib.contextmanager
def _relaid_linears(
    model: nn.Module,
    lay_out: Callable[[torch.Tensor], torch.Tensor],
    multiply: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
    dense: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Every plain nn.Linear multiplies by its weight in another layout inside the block.

    `lay_out(weight)` makes the new layout, `multiply(laid_out, bias, x)` computes the layer
    with it and `dense(laid_out)` gives the (out, in) weight back, exactly. LLaMA's
    projection groups are stacked first (one matmul each). Linear layers inside a LoRA
    wrapper keep their own forward: the wrapper reads their matrices itself. A dense
    weight no other module uses is released meanwhile and rebuilt afterwards, so memory
    does not double; a tied one (the output layer that is also the embedding) stays, as
    the embedding reads it.
    """
    wrapped = {id(m) for w in model.modules() if isinstance(w, LoRALinear) for m in w.modules()}
    users: dict[int, int] = {}  # weight -> how many modules hold it
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            users[id(w)] = users.get(id(w), 0) + 1
    groups: list[tuple[nn.Module, str | None, tuple[nn.Linear, ...]]] = list(_fusable(model))
    skip = wrapped | {id(p) for _, _, parts in groups for p in parts}
    for module in model.modules():
        if type(module) is nn.Linear and id(module) not in skip:
            groups.append((module, None, (module,)))

    done: list[tuple[nn.Module, str | None, tuple[nn.Linear, ...], torch.Tensor, list]] = []
    no_inference = torch.inference_mode(False)  # as in fused_projections
    try:
        for module, name, parts in groups:
            with no_inference, torch.no_grad():
                weight = torch.cat([p.weight for p in parts]) if len(parts) > 1 else parts[0].weight
                laid_out = lay_out(weight)
                bias = parts[0].bias
                if bias is not None and len(parts) > 1:
                    bias = torch.cat([p.bias for p in parts])
            forward = functools.partial(multiply, laid_out, bias)
            released: list[nn.Linear] = []
            done.append((module, name, parts, laid_out, released))
            if name is None:
                module.forward = forward  # an instance attribute: the class's forward is kept
            else:
                setattr(module, name, forward)
            for p in parts:
                if users[id(p.weight)] == 1:
                    p.weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
                    released.append(p)
        yield
    finally:
        with no_inference:
            for module, name, parts, laid_out, released in done:
                if name is None:
                    del module.forward
                else:
                    setattr(module, name, None)
                if released:
                    weight = dense(laid_out)  # the (stacked) weight, as it was
                    start = 0
                    for p in parts:
                        rows = p.out_features
                        if p in released:
                            own = weight[start : start + rows]
                            p.weight.data = own.clone(memory_format=torch.contiguous_format)
                        start += rows
