"""Sampling: filters on hand-made logits, determinism, and KV cache == full recompute."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.errors import UserError
from lmlab.generate.kv_cache import KVCache
from lmlab.generate.sampling import generate, sample_next_token, top_k_filter, top_p_filter
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig

NEG_INF = float("-inf")


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(family=family, vocab_size=61, context_length=48, n_layer=2, n_head=4, d_model=32)
    model = build_model(ModelConfig(**{**base, **overrides}))
    # Larger weights than the 0.02 init give peaked, varied predictions, so greedy decoding
    # does not settle into repeating one token and the comparisons below mean something.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


# ---- filters ---------------------------------------------------------------------------


def test_top_k_filter():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    assert top_k_filter(logits, 2).tolist() == [NEG_INF, 4.0, 3.0, NEG_INF, NEG_INF]
    assert top_k_filter(logits, 1).tolist() == [NEG_INF, 4.0, NEG_INF, NEG_INF, NEG_INF]
    assert top_k_filter(logits, 99).tolist() == logits.tolist()  # k > vocab keeps everything


def test_top_p_filter():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()

    def kept(p: float) -> list[int]:
        return torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist()

    assert kept(0.4) == [1]  # the top token alone reaches 0.4
    assert kept(0.75) == [1, 3]  # 0.5 + 0.3
    assert kept(0.85) == [0, 1, 3]  # 0.5 + 0.3 + 0.15
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]  # the most likely token always survives
    # kept logits are unchanged, not renormalized
    assert top_p_filter(logits, 0.75)[1].item() == pytest.approx(math.log(0.5))


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    assert sample_next_token(logits, temperature=0.0) == 1
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, temperature=1.0, top_k=1, generator=g) == 1


# ---- generate --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [dict(family="gpt2"), dict(family="llama", n_kv_head=2)], ids=["gpt2", "llama"]
)
def test_kv_cache_greedy_equals_full_recompute(overrides):
    model = tiny_model(**overrides)
    prompt = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(0))
    cached = list(generate(model, prompt, 40, temperature=0.0, use_cache=True))
    full = list(generate(model, prompt, 40, temperature=0.0, use_cache=False))
    assert cached == full
    assert len(cached) == 40 and len(set(cached)) > 3  # a varied continuation, not one token


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_logits_equal_full_forward_in_chunks(family):
    """Prefill, then a 5-token chunk (explicit offset mask), then single tokens."""
    model = tiny_model(family)
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_config(model.config, batch_size=2)
    with torch.no_grad():
        full, _ = model(idx)
        pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 8), (8, 13), (13, 14)]]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(14, 20)]
    assert cache.seq_len == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.seq_len == 0


def test_kv_cache_refuses_to_overflow():
    cache = KVCache(n_layer=1, batch_size=1, n_kv_head=1, max_len=4, head_dim=2)
    k = torch.ones(1, 1, 3, 2)
    k_all, _ = cache.update(0, k, k)
    assert k_all.shape == (1, 1, 3, 2) and cache.seq_len == 3
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.update(0, k, k)


@pytest.mark.parametrize("use_cache", [True, False])
def test_seeded_sampling_is_deterministic(use_cache):
    model = tiny_model("llama")
    prompt = torch.tensor([[1, 2, 3]])

    def run(seed: int) -> list[int]:
        return list(
            generate(model, prompt, 20, temperature=1.0, top_p=0.95, seed=seed, use_cache=use_cache)
        )

    torch.manual_seed(123)
    first = run(7)
    torch.manual_seed(456)  # the global RNG does not matter
    assert run(7) == first
    assert run(8) != first


def test_stop_token_is_yielded_then_generation_ends():
    model = tiny_model("gpt2")
    prompt = torch.tensor([[5, 6]])
    tokens = list(generate(model, prompt, 10, temperature=0.0))
    stop = tokens[3]
    stopped = list(generate(model, prompt, 10, temperature=0.0, stop_token_ids=[stop]))
    assert stopped == tokens[: tokens.index(stop) + 1]


def test_context_limits():
    model = tiny_model("llama", context_length=16)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    # With the cache: 6 prompt + 11 new needs 16 positions (the last token is never fed back).
    assert len(list(generate(model, prompt, 11, temperature=0.0))) == 11
    with pytest.raises(UserError, match="does not fit the model's context of 16"):
        generate(model, prompt, 12, temperature=0.0)  # raised at the call, before iterating
    # Without the cache the window slides, so the context is no limit (prompt included).
    long_prompt = torch.randint(0, 61, (1, 30))
    assert len(list(generate(model, long_prompt, 25, temperature=0.0, use_cache=False))) == 25


def test_generate_argument_checks_and_mode_restored():
    model = tiny_model("gpt2").train()
    prompt = torch.tensor([[1, 2]])
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            generate(model, prompt, 3, **bad)
    with pytest.raises(UserError, match="prompt must be a"):
        generate(model, torch.tensor([[1, 2], [3, 4]]), 3)
    stream = generate(model, prompt, 3, seed=0)
    next(stream)
    assert not torch.is_inference_mode_enabled()  # not leaked to the caller between tokens
    assert not model.training
    list(stream)
    assert model.training
