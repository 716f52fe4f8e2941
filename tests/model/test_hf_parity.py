"""Our models against Hugging Face transformers on tiny random configs (fp32, CPU).

Every parameter is randomized first (norm weights and biases included), so a tensor copied
to the wrong place would change the logits.
"""

from __future__ import annotations

import pytest
import torch

from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.hf import from_hf, to_hf

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT = 101, 24
CONFIGS = {
    "gpt2": dict(family="gpt2"),
    "gpt2-untied": dict(family="gpt2", tie_embeddings=False),
    "gpt2-no-bias": dict(family="gpt2", bias=False),
    "llama": dict(family="llama"),
    "llama-gqa": dict(family="llama", n_head=4, n_kv_head=2),
    "llama-mqa-tied": dict(family="llama", n_head=4, n_kv_head=1, tie_embeddings=True),
    "llama-bias-theta": dict(family="llama", bias=True, rope_theta=500.0, d_ff=50),
}


def make_config(name: str) -> ModelConfig:
    base = dict(vocab_size=VOCAB, context_length=CONTEXT, n_layer=2, n_head=4, d_model=32)
    return ModelConfig(**{**base, **CONFIGS[name]})


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def hf_logits(hf_model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=idx).logits


def our_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_hf_logits_match(name, idx):
    model = build_model(make_config(name)).eval()
    randomize(model, seed=0)
    hf_model = to_hf(model)
    expected_class = "GPT2LMHeadModel" if model.config.family == "gpt2" else "LlamaForCausalLM"
    assert type(hf_model).__name__ == expected_class
    diff = (our_logits(model, idx) - hf_logits(hf_model, idx)).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_hf_logits_match(name, idx):
    from lmlab.model.hf import to_hf_config

    hf_config = to_hf_config(make_config(name))
    hf_class = (
        transformers.GPT2LMHeadModel
        if hf_config.model_type == "gpt2"
        else transformers.LlamaForCausalLM
    )
    hf_model = hf_class(hf_config).eval()
    randomize(hf_model, seed=0)
    model = from_hf(hf_model)
    diff = (our_logits(model, idx) - hf_logits(hf_model, idx)).abs().max().item()
    assert diff < 1e-5
    # The architecture survives the round trip; ffn_multiple_of is ours alone (d_ff is explicit)
    # and HF GPT-2 always has biases.
    expected = make_config(name)
    expected.bias = True if expected.family == "gpt2" else expected.bias
    assert model.config.to_dict() | {"ffn_multiple_of": 0} == expected.to_dict() | {
        "ffn_multiple_of": 0
    }


def test_tied_weights_stay_tied_both_ways():
    model = build_model(make_config("llama-mqa-tied"))
    hf_model = to_hf(model)
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    back = from_hf(hf_model)
    assert back.lm_head.weight is back.tok_emb.weight


def test_from_hf_rejects_unsupported_variants():
    from lmlab.errors import UserError

    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        hidden_act="gelu",
    )
    with pytest.raises(UserError, match="activation 'gelu' is not supported"):
        from_hf(transformers.LlamaForCausalLM(hf_config))
