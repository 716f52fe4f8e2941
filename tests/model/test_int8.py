"""int8 weight-only inference: the quantization error bound, the blockwise product against
the plain dequantize + F.linear reference, and whole models whose logits and greedy
generation stay close to float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.generate.batch import generate_batch
from lmlab.generate.sampling import generate
from lmlab.model import quant
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.lora import LoRAConfig, LoRALinear, apply_lora
from lmlab.model.quant import Int8Linear, quantize_int8, quantize_linears_int8


def tiny_model(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    base = dict(family=family, vocab_size=61, context_length=48, n_layer=2, n_head=4, d_model=32)
    model = build_model(ModelConfig(**{**base, **overrides}))
    with torch.no_grad():  # peaked predictions, so greedy tokens mean something
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def test_each_number_is_within_half_a_step_of_its_weight():
    torch.manual_seed(1)
    w = torch.randn(40, 24) * torch.rand(40, 1) * 3
    w[7] = 0.0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert q.abs().max() == 127  # each row's largest magnitude maps to 127
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert (q[7] == 0).all() and scale[7] == 1


@pytest.mark.parametrize("block_rows", [512, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 24), (5, 24), (2, 3, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_int8_product_matches_the_dequantized_reference(
    monkeypatch, block_rows, dtype, shape, bias
):
    """40 output rows in one block, or in blocks of 16 (two whole blocks and a partial
    one); bf16 and fp16 activations too (24 inputs: no multiple of 16, which crashed
    PyTorch's own int8 kernel with bf16)."""
    monkeypatch.setattr(quant, "INT8_BLOCK_ROWS", block_rows)
    torch.manual_seed(2)
    linear = nn.Linear(24, 40, bias=bias)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(*shape).to(dtype)
    reference = F.linear(
        x.float(), layer.dequantized_weight(), None if linear.bias is None else linear.bias
    )
    got = layer(x)
    assert got.dtype == dtype and got.shape == (*shape[:-1], 40)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), reference, atol=tol, rtol=tol)


def test_fp16_products_do_not_overflow_before_the_scale():
    """x @ int8 alone would reach 64 * 20 * 127 = 162,560, past fp16's 65,504; the product
    with the dequantized weight (~325) must come out finite and right."""
    layer = Int8Linear(torch.full((3, 64), 127, dtype=torch.int8), torch.full((3,), 0.002))
    x = torch.full((2, 64), 20.0)
    got = layer(x.half())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(
        got.float(), F.linear(x, layer.dequantized_weight()), rtol=2e-3, atol=0
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_a_quantized_model_keeps_its_logits_and_generates(family, tie):
    model = tiny_model(family, tie_embeddings=tie)
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        reference, _ = model(idx)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    count, saved = quantize_linears_int8(model)
    assert count == linears and not any(type(m) is nn.Linear for m in model.modules())
    matmul_bytes = sum(
        m.weight_int8.numel() * 3 for m in model.modules() if isinstance(m, Int8Linear)
    )
    head = model.lm_head.weight_int8.numel() * 4
    # 4 bytes -> 1 a number, less the scales; a tied output layer's matrix stays (embedding)
    assert saved == pytest.approx(matmul_bytes - (head if tie else 0), rel=0.05)
    with torch.no_grad():
        logits, _ = model(idx)
    # the error of int8 weights: small next to the logits' spread (1-6% of it measured at
    # worst here, through two layers), not bitwise; the chosen tokens stay
    error = (logits - reference).abs()
    assert error.max() < 0.12 * reference.std() and error.mean() < 0.03 * reference.std()
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    prompts = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6]]
    alone = [list(generate(model, torch.tensor([p]), 10, temperature=0.0)) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=10) == alone


def test_a_lora_base_is_quantized_and_its_adapters_are_not():
    model = tiny_model("llama")
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
        idx = torch.tensor([[3, 1, 4, 1, 5]])
        reference, _ = model(idx)
        quantize_linears_int8(model)
        wrapper = model.blocks[0].attn.q_proj
        assert isinstance(wrapper, LoRALinear) and isinstance(wrapper.base, Int8Linear)
        assert type(wrapper.lora_A) is nn.Linear and type(wrapper.lora_B) is nn.Linear
        logits, _ = model(idx)
    assert (logits - reference).abs().max() < 0.12 * reference.std()
