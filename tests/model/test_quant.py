"""NF4 quantization (lmlab.model.quant): levels, round trip, the frozen layer, QLoRA on top."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.lora import LoRAConfig, apply_lora, lora_modules, trainable_parameters
from lmlab.model.quant import (
    BLOCK_SIZE,
    NF4Linear,
    dequantize_nf4,
    nf4_levels,
    quantize_base,
    quantize_nf4,
)

# QLoRA paper, appendix E / bitsandbytes, rounded to 4 decimals
PUBLISHED_NF4 = [
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
]  # fmt: skip


def test_levels_match_the_published_table():
    levels = nf4_levels()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    torch.testing.assert_close(levels, torch.tensor(PUBLISHED_NF4), atol=1e-4, rtol=0)
    assert levels[7] == 0.0  # exact zero


@pytest.mark.parametrize("shape", [(64, 128), (37, 50), (3,), (5, 7, 11)])
def test_round_trip_error_is_bounded_by_half_the_widest_gap(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.02
    packed, absmax, got_shape = quantize_nf4(weight)
    n_blocks = -(-weight.numel() // BLOCK_SIZE)
    assert got_shape == weight.shape
    assert packed.dtype == torch.uint8 and packed.numel() == n_blocks * BLOCK_SIZE // 2
    assert absmax.dtype == torch.float32 and absmax.numel() == n_blocks
    restored = dequantize_nf4(packed, absmax, got_shape)
    assert restored.shape == weight.shape
    # nearest level: at most half the widest gap between levels (1 - 0.7230) times the block scale
    levels = nf4_levels()
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    flat = F.pad(weight.reshape(-1), (0, -weight.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
    err = F.pad((restored - weight).reshape(-1), (0, -weight.numel() % BLOCK_SIZE))
    err = err.view(-1, BLOCK_SIZE).abs()
    assert (err <= half_gap * flat.abs().amax(1, keepdim=True) + 1e-7).all()
    # for normal weights the typical error is far smaller than the bound
    assert (restored - weight).abs().mean() < 0.05 * weight.abs().max()
    # each block's largest magnitude is a level (+-1) times itself: exact
    assert torch.equal(restored.reshape(-1).abs().max(), weight.abs().max())


def test_zero_blocks_and_zeros_stay_exact():
    weight = torch.zeros(2, BLOCK_SIZE)
    weight[1, 3] = 0.5
    restored = dequantize_nf4(*quantize_nf4(weight))
    assert torch.equal(restored, weight)


def _layer(bias: bool = True) -> tuple[nn.Linear, NF4Linear]:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    return linear, NF4Linear.from_linear(linear)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_f_linear_with_the_dequantized_weight(bias):
    linear, layer = _layer(bias)
    x = torch.randn(3, 5, 96)
    expected = F.linear(x, layer.dequantized_weight(), linear.bias)
    assert torch.equal(layer(x), expected)
    assert (layer.in_features, layer.out_features) == (96, 40)


def test_gradient_wrt_input_matches_autograd_and_weight_gets_none():
    linear, layer = _layer()
    x = torch.randn(4, 7, 96, dtype=torch.float32, requires_grad=True)
    grad_out = torch.randn(4, 7, 40)
    layer(x).backward(grad_out)
    ref_x = x.detach().clone().requires_grad_(True)
    F.linear(ref_x, layer.dequantized_weight(), linear.bias.detach()).backward(grad_out)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-6, rtol=0)
    assert list(layer.parameters()) == [layer.bias] and not layer.bias.requires_grad
    assert layer.bias.grad is None
    assert {name for name, _ in layer.named_buffers()} == {"packed", "absmax", "levels"}
    assert set(layer.state_dict()) == {"packed", "absmax", "bias"}  # levels are recomputed


def test_backward_keeps_only_the_packed_weight():
    """Autograd's saved tensors for the layer: the 4-bit buffers, not a dequantized copy."""
    _, layer = _layer(bias=False)
    x = torch.randn(2, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert all(t.dtype in (torch.uint8, torch.float32) for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) <= layer.weight_bytes() + 64


def test_weight_memory_is_about_an_eighth_of_fp32():
    linear, layer = _layer(bias=False)
    fp32 = linear.weight.numel() * 4
    assert layer.packed.numel() * layer.packed.element_size() == fp32 // 8
    assert layer.weight_bytes() == fp32 // 8 + 4 * linear.weight.numel() // BLOCK_SIZE
    assert layer.weight_bytes() / fp32 == pytest.approx(0.5625 / 4)


def test_autocast_computes_in_the_autocast_dtype():
    _, layer = _layer()
    x = torch.randn(2, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


CFG = dict(vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=64)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_qlora_trains_and_stays_close_to_the_unquantized_model(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family=family, **CFG))
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    for module in lora_modules(model).values():  # nonzero adapters, so they take part
        nn.init.normal_(module.lora_B.weight, std=0.02)
    idx = torch.randint(0, CFG["vocab_size"], (2, 16))
    with torch.no_grad():
        reference = model(idx)[0]
    fp32_bytes = sum(m.base.weight.numel() * 4 for m in lora_modules(model).values())
    trainable_before = trainable_parameters(model)

    saved = quantize_base(model)

    bases = [m.base for m in lora_modules(model).values()]
    assert all(isinstance(b, NF4Linear) for b in bases)
    assert saved == fp32_bytes - sum(b.weight_bytes() for b in bases)
    assert saved > 0.85 * fp32_bytes
    assert trainable_parameters(model) == trainable_before  # adapters only
    with torch.no_grad():
        quantized = model(idx)[0]
    relative = (quantized - reference).norm() / reference.norm()
    assert relative < 0.1, relative

    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapters, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(idx, idx)[1]
        loss.backward()
        assert all(p.grad is not None for p in adapters)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(b.bias is None or b.bias.grad is None for b in bases)


def test_nf4_matches_bitsandbytes():
    """Our NF4 (levels from their definition, blockwise absmax) against the reference
    implementation, where bitsandbytes' CPU path is installed."""
    functional = pytest.importorskip("bitsandbytes.functional")
    from lmlab.model.quant import dequantize_nf4, quantize_nf4

    # (bitsandbytes 0.50.2's CPU path itself goes wrong on some shapes, e.g. 256 x 96.)
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    theirs = functional.dequantize_4bit(packed, state)
    ours = dequantize_nf4(*quantize_nf4(weight))
    assert (ours - theirs).abs().max().item() < 1e-5
