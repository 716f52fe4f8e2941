"""The estimator's inputs: the closed forms it reads agree with real models."""

from __future__ import annotations

import random

import pytest
import torch

from lmlab.estimate.plan import make_plan
from lmlab.model.build import build_model, flops_per_token, param_count
from lmlab.model.config import ModelConfig
from lmlab.model.presets import MODEL_PRESETS, get_model_preset

BIG = {"gpt2-124m", "llama-1.36b", "gpt2-1.36b", "llama-134m", "llama-374m", "moe-1b"}


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_param_count_matches_every_preset(name):
    cfg = get_model_preset(name)
    device = "meta" if name in BIG else "cpu"
    model = build_model(cfg, device=device)
    assert param_count(cfg) == model.num_params()
    assert param_count(cfg, exclude_embeddings=True) == model.num_params(exclude_embeddings=True)
    assert flops_per_token(cfg) == model.flops_per_token()


def random_config(family: str, rng: random.Random) -> ModelConfig:
    n_kv_head = rng.choice([1, 2, 4]) if family == "llama" else None
    n_head = (n_kv_head or 1) * rng.choice([1, 2, 3]) if family == "llama" else rng.randint(1, 4)
    return ModelConfig(
        family=family,
        vocab_size=rng.randint(5, 300),
        context_length=rng.randint(1, 64),
        n_layer=rng.randint(1, 3),
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=n_head * 2 * rng.randint(1, 6),
        d_ff=rng.choice([None, rng.randint(1, 64)]),
        ffn_multiple_of=rng.choice([1, 8, 64]),
        bias=rng.choice([None, True, False]),
        tie_embeddings=rng.choice([None, True, False]),
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_plan_reads_the_models_own_counts_for_random_configs(family):
    rng = random.Random(0)
    for _ in range(50):
        cfg = random_config(family, rng)
        with torch.device("meta"):
            model = build_model(cfg)
        plan = make_plan(cfg, tokens=1e6, hardware="h100", micro_batch=1)
        assert plan["params"] == model.num_params()
        assert plan["non_embedding_params"] == model.num_params(exclude_embeddings=True)
        assert plan["flops_per_token"] == model.flops_per_token()


def test_plan_reads_a_mixture_of_experts_own_total_and_active_counts():
    rng = random.Random(17)
    for _ in range(20):
        n_expert = rng.randint(1, 16)
        cfg = ModelConfig(
            family="moe",
            vocab_size=rng.randint(5, 300),
            context_length=rng.randint(1, 64),
            n_layer=rng.randint(1, 3),
            n_head=2,
            d_model=4 * rng.randint(1, 8),
            d_ff=rng.randint(1, 64),
            n_expert=n_expert,
            n_expert_per_token=rng.randint(1, n_expert),
            tie_embeddings=rng.choice([True, False]),
        )
        model = build_model(cfg, device="meta")
        plan = make_plan(cfg, tokens=1e6, hardware="h100", micro_batch=1)
        assert plan["params"] == model.num_params()
        assert plan["active_params"] == model.num_active_params()
        assert plan["flops_per_token"] == model.flops_per_token()
        assert plan["memory_per_gpu"]["weights_bytes"] == 4 * model.num_params()
