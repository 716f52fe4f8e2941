"""Weights laid out for generation give the plain model's logits, and are put back: same
values, own contiguous storage, ordinary (trainable) tensors, also after an error."""

from __future__ import annotations

import functools

import pytest
import torch

from lmlab.generate.inference import (
    column_major_linears,
    fused_projections,
    inference_weights,
    onednn_linear_available,
    packed_linears,
    split_linears,
)
from lmlab.generate.sampling import generate
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.lora import LoRAConfig, apply_lora

needs_onednn = pytest.mark.skipif(
    not onednn_linear_available(torch.float32), reason="this torch build has no oneDNN"
)

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
    tied = bool(overrides.get("tie_embeddings"))
    relaid = (several_rows and onednn_linear_available(torch.float32)) or (
        not several_rows and torch.get_num_threads() > 1
    )
    with torch.no_grad():
        reference, _ = model(IDX)
        with inference_weights(model, several_rows):
            attn = model.blocks[0].attn
            assert attn.fused_qkv is not None and model.blocks[0].mlp.fused_gate_up is not None
            if relaid:  # packed (several rows) or split (one row): the dense weights released,
                # but the tied output layer is also the embedding, which reads it
                assert attn.q_proj.weight.numel() == 0 and attn.o_proj.weight.numel() == 0
                assert (model.lm_head.weight.numel() > 0) == tied
            else:  # stacked, column-major
                assert attn.fused_qkv.args[0].t().is_contiguous()
                assert model.lm_head.weight.t().is_contiguous()
            laid_out, _ = model(IDX)
    torch.testing.assert_close(laid_out, reference, atol=1e-5, rtol=0)
    assert_put_back(model, before)
    if tied:
        assert model.lm_head.weight is model.tok_emb.weight


def test_stacked_projections_are_views_of_one_column_major_matrix():
    model = tiny_model("llama", bias=True)
    before = snapshot(model)
    with torch.no_grad():
        reference, _ = model(IDX)
        with fused_projections(model, column_major=True), column_major_linears(model):
            attn = model.blocks[0].attn
            weight, bias = attn.fused_qkv.args
            # The Linear weights are views of the stacked matrix: nothing is held twice.
            assert (
                attn.q_proj.weight.untyped_storage().data_ptr()
                == weight.untyped_storage().data_ptr()
            )
            assert (
                attn.v_proj.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
            )
            assert weight.t().is_contiguous() and model.lm_head.weight.t().is_contiguous()
            laid_out, _ = model(IDX)
    torch.testing.assert_close(laid_out, reference, atol=1e-5, rtol=0)
    assert_put_back(model, before)


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


# Layouts whose layers multiply by their own copy of the weights. Split in 4, the output
# layer (61 rows) does not divide and stays in one block.
RELAID = {
    "packed": pytest.param(packed_linears, marks=needs_onednn),
    "split-2": functools.partial(split_linears, parts=2),
    "split-4": functools.partial(split_linears, parts=4),
}


@pytest.mark.parametrize("layout", RELAID.values(), ids=RELAID.keys())
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_relaid_weights_give_the_plain_logits_and_come_back_bit_for_bit(layout, family, tie):
    model = tiny_model(family, tie_embeddings=tie, bias=True)
    before = snapshot(model)
    with torch.no_grad():
        reference, _ = model(IDX)
        with layout(model):
            released = [n for n, p in model.named_parameters() if p.numel() == 0]
            assert released and all(n.endswith("weight") for n in released)
            # A tied output layer is the embedding too, which reads it: kept.
            assert "tok_emb.weight" not in released
            assert ("lm_head.weight" in released) == (not tie)
            laid_out, _ = model(IDX)
            one_row, _ = model(IDX[:1, :1])
        plain_one_row, _ = model(IDX[:1, :1])
    torch.testing.assert_close(laid_out, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_row, plain_one_row, atol=1e-5, rtol=0)
    assert_put_back(model, before)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("layout", RELAID.values(), ids=RELAID.keys())
def test_relaid_weights_leave_lora_layers_to_their_own_forward(layout):
    model = tiny_model("llama")
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    before = snapshot(model)
    with torch.no_grad():
        reference, _ = model(IDX)
        with layout(model):
            block = model.blocks[0]
            assert block.attn.fused_qkv is None  # q is wrapped: k and v are packed alone
            assert block.attn.q_proj.base.weight.numel() > 0  # read by the LoRA wrapper
            assert block.attn.k_proj.weight.numel() == 0
            laid_out, _ = model(IDX)
    torch.testing.assert_close(laid_out, reference, atol=1e-5, rtol=0)
    assert_put_back(model, before)
