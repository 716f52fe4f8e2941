"""4-bit NormalFloat (NF4) frozen weights, the base of QLoRA (Dettmers et al., 2023).

Pretrained weights are close to normally distributed, so QLoRA quantizes them to the 16
levels that split a standard normal into equal-probability bins: each level is used about
equally often, which is what an information-theoretically optimal 4-bit code does. A
weight is cut into blocks of 64 numbers; each block is divided by its largest magnitude
(absmax, kept in fp32) so it lies in [-1, 1], and each number is replaced by the index of
the nearest level. Two 4-bit indices share one byte, so a weight costs 0.5 byte per number
plus 4 bytes of absmax per 64 numbers (0.5625 byte in all, against 4 in fp32).

    quantize_base(model)          # after apply_lora: every adapter's frozen base becomes NF4
    ...                           # train the adapters exactly as with plain LoRA

Pure PyTorch, on CPU and CUDA: the weight is dequantized right before each matmul and
dropped right after. The backward pass dequantizes it again instead of keeping it, so
between the two passes only the 4-bit copy is in memory (QLoRA's double quantization of
absmax and paged optimizers are not done here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import UserError
from lmlab.model.config import QUANTIZATIONS
from lmlab.model.lora import lora_modules

BLOCK_SIZE = 64  # numbers per absmax scale, as in QLoRA


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1], computed from their definition (float32).

    8 positive levels are normal quantiles at evenly spaced probabilities from 0.5 up to
    `offset`, 7 negative ones likewise on the other side, plus an exact zero (so zero
    padding and zero weights stay exact); each side is scaled so its extreme is +-1. The
    quantile at probability 1 is infinite, so the last one is taken at `offset`, the midpoint
    of 1 - 1/(2*15) and 1 - 1/(2*16): QLoRA's choice (bitsandbytes' create_normal_map).
    """
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    # float64 for the quantiles: the published table is rounded from them, not from fp32
    positive = torch.special.ndtri(torch.linspace(0.5, offset, 9, dtype=torch.float64)[1:])
    negative = -torch.special.ndtri(torch.linspace(0.5, offset, 8, dtype=torch.float64)[1:])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """(packed uint8 with two 4-bit indices per byte, fp32 absmax per block of 64, shape).

    The flattened weight is zero-padded to a whole number of blocks (zero is a level, so
    padding is exact). In each byte the first index is the high nibble.
    """
    shape = weight.shape
    flat = weight.detach().reshape(-1).float()
    pad = -flat.numel() % BLOCK_SIZE
    blocks = F.pad(flat, (0, pad)).view(-1, BLOCK_SIZE)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # an all-zero block: any nonzero scale maps it to level 0.0 exactly
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    levels = nf4_levels().to(weight.device)
    # nearest level: the levels are sorted, so count the midpoints below each number
    midpoints = (levels[1:] + levels[:-1]) / 2
    indices = torch.bucketize(scaled, midpoints).to(torch.uint8).view(-1, 2)  # (n/2, 2)
    packed = (indices[:, 0] << 4) | indices[:, 1]  # (numel_padded / 2,)
    return packed, absmax, shape


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight quantize_nf4 encoded, in `dtype`: level[index] * absmax of its block."""
    levels = nf4_levels().to(packed.device) if levels is None else levels
    indices = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1, BLOCK_SIZE)
    blocks = levels[indices.long()] * absmax[:, None]  # (n_blocks, 64), fp32
    numel = torch.Size(shape).numel()
    return blocks.view(-1)[:numel].view(shape).to(dtype)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; the gradient flows to x only.

    Autograd through F.linear would save the dequantized W (4 bytes a number in fp32)
    for the backward pass; this saves only the packed buffers, which the module holds
    anyway, and dequantizes again in backward: one more cheap elementwise pass per layer.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, levels, bias, shape, dtype):
        weight = dequantize_nf4(packed, absmax, shape, dtype, levels)  # (out, in)
        ctx.save_for_backward(packed, absmax, levels)
        ctx.shape, ctx.dtype = shape, dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed, absmax, levels = ctx.saved_tensors
            weight = dequantize_nf4(packed, absmax, ctx.shape, ctx.dtype, levels)  # (out, in)
            grad_x = grad_output.matmul(weight)  # (..., out) @ (out, in) -> (..., in)
        return grad_x, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: 0.5625 byte per number."""

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # buffers, not parameters: they move with .to() and are saved, but no optimizer sees them
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("levels", nf4_levels().to(packed.device), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        """Quantize an nn.Linear's weight; its bias is kept as it is, frozen."""
        packed, absmax, _ = quantize_nf4(linear.weight)
        return cls(packed, absmax, linear.in_features, linear.out_features, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, shape (out, in)."""
        return dequantize_nf4(
            self.packed, self.absmax, (self.out_features, self.in_features), dtype, self.levels
        )

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: packed indices plus absmax scales."""
        return self.packed.numel() * self.packed.element_size() + (
            self.absmax.numel() * self.absmax.element_size()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast compute as nn.Linear would (bf16/fp16), else in the input's dtype
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        shape = (self.out_features, self.in_features)
        return _NF4LinearFunction.apply(
            x.to(dtype), self.packed, self.absmax, self.levels, bias, shape, dtype
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4 block={BLOCK_SIZE}"
        )


def _linear_bytes(linear: nn.Linear) -> int:
    return linear.weight.numel() * linear.weight.element_size()


def quantize_base(model: nn.Module, targets: tuple[str, ...] | list[str] | None = None) -> int:
    """Replace the frozen `.base` of every LoRALinear (leaf name in `targets`, or all) by NF4.

    Call after apply_lora: the adapters stay as they are and train unchanged on top of the
    4-bit base (QLoRA). Returns the weight bytes saved.
    """
    saved = 0
    for name, module in lora_modules(model).items():
        if targets is not None and name.rpartition(".")[2] not in targets:
            continue
        if isinstance(module.base, nn.Linear):
            quantized = NF4Linear.from_linear(module.base)
            saved += _linear_bytes(module.base) - quantized.weight_bytes()
            module.base = quantized
    return saved


# ---- int8 weight-only inference ----------------------------------------------------------
#
# For generating and evaluating where memory is short (a laptop, a large model): each
# output row of a weight is divided by its largest magnitude / 127 (one fp32 scale per
# row) and rounded to int8, a quarter of fp32's bytes. Activations stay in floating point.
# The product dequantizes a block of INT8_BLOCK_ROWS rows at a time (`dequantize_int8`)
# and multiplies by it, so the float copy of a weight is never held whole and each block
# is the plain reference's own numbers.
# Inference only: no gradient flows through the int8 weight.
#
# Why not PyTorch's int8 weight kernel, `torch.ops.aten._weight_int8pack_mm` (what
# torchao's CPU path calls)? Measured on this project's AMD EPYC VMs with PyTorch 2.13 it
# ran 5-19x (AVX2) and 5-30x (AVX-512) slower than float32, where dequantizing blocks ran
# 2-4x slower per product and at 0.6x float32's tokens/s in whole generation; and with
# bf16 activations on AVX-512 it crashed (segmentation fault) whenever the input width
# was not a multiple of 16. So int8 here saves memory (a quarter of float32's weight
# bytes) rather than time: BENCHMARKS.md has the numbers.

INT8_BLOCK_ROWS = 512  # rows dequantized at once: 512 x 384 inputs is 0.8 MB of fp32


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows times their fp32 scales, computed in fp32 and returned as `dtype`."""
    return (q.float() * scale[:, None]).to(dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), fp32 scale per output row (out,)): weight ~ int8 * scale.

    Symmetric, per output channel: a row's largest magnitude maps to 127, so each number
    is off by at most half a step (scale / 2). An all-zero row gets scale 1 (all zeros).
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """An inference-only linear layer with an int8 weight and one fp32 scale per output
    row: 1 byte per number, plus 4 bytes a row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, shape (out, in): the plain reference."""
        return dequantize_int8(self.weight_int8, self.scale, dtype)

    def weight_bytes(self) -> int:
        return self.weight_int8.numel() + self.scale.numel() * self.scale.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scales = self.weight_int8.split(INT8_BLOCK_ROWS), self.scale.split(INT8_BLOCK_ROWS)
        blocks = zip(rows, scales, strict=True)
        parts = [F.linear(x, dequantize_int8(q, s, x.dtype)) for q, s in blocks]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8 per output row"
        )


@torch.no_grad()
def quantize_linears_int8(model: nn.Module) -> tuple[int, int]:
    """Replace every plain nn.Linear of `model` by an Int8Linear, for inference.

    A LoRA wrapper's frozen base is quantized too; its small A and B matrices stay (the
    wrapper reads them directly). An output layer tied to the embedding gets its own int8
    copy and the embedding keeps its floating-point matrix. Returns (layers quantized,
    weight bytes saved).
    """
    adapters = {id(m) for lora in lora_modules(model).values() for m in (lora.lora_A, lora.lora_B)}
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and id(child) not in adapters
    ]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved = 0
    for parent, name, linear in targets:
        quantized = Int8Linear.from_linear(linear)
        if id(linear.weight) not in embeddings:  # a tied matrix stays, for the embedding
            saved += _linear_bytes(linear)
        saved -= quantized.weight_bytes()
        setattr(parent, name, quantized)
    return len(targets), saved


def quantize_for_inference(model: nn.Module, method: str | None) -> tuple[int, int]:
    """Apply `--quantize METHOD` (None: nothing) to a model loaded for inference; returns
    (layers quantized, weight bytes saved)."""
    if method is None:
        return 0, 0
    if method not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {method!r}: choose {', '.join(QUANTIZATIONS)}")
    return quantize_linears_int8(model)
