"""Weights laid out for generation give the plain model's logits, and are put back: same
values, own contiguous storage, ordinary (trainable) tensors, also after an error."""

from __future__ import annotations

import pytest
import torch

from lmlab.generate.inference import column_major_linears, fused_projections, inference_weights
from lmlab.generate.sampling import generate
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.lora import LoRAConfig, apply_lora

IDX = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(family=family, vocab_size=61, context_length=48, n_layer=2, n_head=4, d_model=32)
    model = build_model(ModelConfig(**{**base, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_put_back(model, before: dict[str, torch.Tensor]) -> None:
    pointers = set()
    for name, p in model.named_parameters():
        assert p.is_contiguous() and not p.is_inference() and torch.equal(p, before[name]), name
        assert p.data_ptr() not in pointers, f"{name} shares storage"
        pointers.add(p.data_ptr())
    for module in model.modules():
        assert getattr(module, "fused_qkv", None) is None
        assert getattr(module, "fused_gate_up", None) is None


@pytest.mark.parametrize(
    "overrides", [{}, {"n_kv_head": 2}, {"bias": True}, {"tie_embeddings": True}]
)
@pytest.mark.parametrize("several_rows", [False, True])
def test_layouts_give_the_plain_logits(overrides, several_rows):
    model = tiny_model("llama", **overrides)
    before = snapshot(model)
    with torch.no_grad():
        reference, _ = model(IDX)
        with inference_weights(model, several_rows):
            attn = model.blocks[0].attn
            assert attn.fused_qkv is not None and model.blocks[0].mlp.fused_gate_up is not None
            # The Linear weights are views of the stacked matrix: nothing is held twice.
            weight = attn.fused_qkv[0]
            assert (
                attn.q_proj.weight.untyped_storage().data_ptr()
                == weight.untyped_storage().data_ptr()
            )
            assert weight.t().is_contiguous()  # column-major on the CPU, one row or several
            assert model.lm_head.weight.t().is_contiguous()
            laid_out, _ = model(IDX)
    torch.testing.assert_close(laid_out, reference, atol=1e-5, rtol=0)
    assert_put_back(model, before)
    if overrides.get("tie_embeddings"):
        assert model.lm_head.weight is model.tok_emb.weight


def test_put_back_after_an_error_and_trainable_after_streaming():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"), inference_weights(model, True):
        raise RuntimeError("a failure inside")
    assert_put_back(model, before)
    # `generate` lays out inside inference mode, one step at a time; the weights it puts
    # back must still train.
    tokens = list(generate(model, IDX[:1], 5, temperature=0.0))
    assert len(tokens) == 5
    assert_put_back(model, before)
    model.train()
    _, loss = model(IDX, IDX)
    loss.backward()
    assert model.blocks[0].attn.q_proj.weight.grad is not None


def test_lora_wrapped_projections_keep_their_own_forward():
    model = tiny_model("llama")
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
        reference, _ = model(IDX)
        with fused_projections(model):
            assert model.blocks[0].attn.fused_qkv is None  # wrapped: not stacked
            assert model.blocks[0].mlp.fused_gate_up is not None  # plain: stacked
            laid_out, _ = model(IDX)
    torch.testing.assert_close(laid_out, reference, atol=1e-5, rtol=0)


def test_column_major_weights_for_both_families():
    for family in ("gpt2", "llama"):
        model = tiny_model(family, tie_embeddings=True)
        before = snapshot(model)
        with torch.no_grad():
            reference, _ = model(IDX)
            with column_major_linears(model):
                w = model.lm_head.weight
                assert not w.is_contiguous() and w.t().is_contiguous()
                laid_out, _ = model(IDX)
        torch.testing.assert_close(laid_out, reference, atol=1e-5, rtol=0)
        assert_put_back(model, before)
