"""Batched generation: left-padded rows give what each prompt gives alone (greedy), for
both families and LoRA-wrapped models; stop tokens, should_stop, seeds and bad input."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import UserError
from lmlab.generate.batch import generate_batch
from lmlab.generate.kv_cache import KVCache
from lmlab.generate.sampling import generate
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.lora import LoRAConfig, apply_lora

PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [33, 12, 40, 8, 8], [60, 3]]


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(family=family, vocab_size=61, context_length=48, n_layer=2, n_head=4, d_model=32)
    model = build_model(ModelConfig(**{**base, **overrides}))
    # Larger weights than the 0.02 init: peaked, varied predictions, so that a padding or
    # position mistake changes the tokens instead of hiding in a repeated one.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def alone(model, prompt: list[int], max_new_tokens: int, stops=()) -> list[int]:
    new = list(
        generate(
            model, torch.tensor([prompt]), max_new_tokens, temperature=0.0, stop_token_ids=stops
        )
    )
    return new[:-1] if new and new[-1] in stops else new


MODELS = {
    "gpt2": lambda: tiny_model("gpt2"),
    "llama": lambda: tiny_model("llama"),
    "llama-gqa": lambda: tiny_model("llama", n_kv_head=2),
    "gpt2-lora": lambda: _with_lora(tiny_model("gpt2")),
    "llama-lora": lambda: _with_lora(tiny_model("llama")),
}


def _with_lora(model: torch.nn.Module) -> torch.nn.Module:
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # non-zero B, so the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch_size", [None, 2])
def test_greedy_batch_equals_one_prompt_at_a_time(name, batch_size):
    model = MODELS[name]()
    expected = [alone(model, p, 12) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) == len(PROMPTS)  # varied: the check means something
    got = generate_batch(model, PROMPTS, max_new_tokens=12, batch_size=batch_size, pad_id=0)
    assert got == expected


def test_padded_prefill_logits_equal_the_unpadded_ones():
    """The padded forward pass itself: each row's logits at its real positions match."""
    for family in ("gpt2", "llama"):
        model = tiny_model(family)
        short, long = [4, 8, 15], [16, 23, 42, 1, 2]
        pad = len(long) - len(short)
        idx = torch.tensor([[0] * pad + short, long])
        positions = torch.tensor([[0] * pad + list(range(len(short))), list(range(len(long)))])
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        valid = torch.tensor([[False] * pad + [True] * 3, [True] * 5])
        mask = (causal & (valid[:, None, :] | torch.eye(5, dtype=torch.bool)))[:, None]
        with torch.no_grad():
            logits, _ = model(idx, positions=positions, attn_mask=mask)
            ref_short, _ = model(torch.tensor([short]))
            ref_long, _ = model(torch.tensor([long]))
        torch.testing.assert_close(logits[0, pad:], ref_short[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], ref_long[0], atol=1e-5, rtol=0)
        assert torch.isfinite(logits).all()  # pad queries read themselves: no NaN


def test_stop_tokens_end_a_row_and_are_not_returned():
    model = tiny_model("llama")
    free = [alone(model, p, 10) for p in PROMPTS]
    stop = free[0][3]  # a token the first prompt produces, fourth
    got = generate_batch(model, PROMPTS, max_new_tokens=10, stop_token_ids=[stop])
    for row, full in zip(got, free, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert row == expected
    assert got[0] == free[0][:3]


def test_should_stop_ends_a_row_with_its_ids_kept_and_sees_input_indices():
    model = tiny_model("gpt2")
    calls: dict[int, int] = {}

    def should_stop(index: int, new_ids: list[int]) -> bool:
        calls[index] = calls.get(index, 0) + 1
        return index == 2 and len(new_ids) == 4  # only prompt 2 stops early

    got = generate_batch(model, PROMPTS, max_new_tokens=9, should_stop=should_stop, batch_size=2)
    assert [len(r) for r in got] == [9, 9, 4, 9, 9]
    assert got[2] == alone(model, PROMPTS[2], 4)
    assert calls == {0: 9, 1: 9, 2: 4, 3: 9, 4: 9}


def test_progress_is_reported_per_batch():
    seen = []
    generate_batch(
        tiny_model("gpt2"), PROMPTS, max_new_tokens=2, batch_size=2, on_batch=seen.append
    )
    assert seen == [2, 4, 5]


def test_sampling_with_a_seed_is_repeatable():
    model = tiny_model("llama")

    def sample(seed):
        return generate_batch(
            model, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=seed
        )

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_cache_rows_can_be_dropped():
    cache = KVCache(1, 3, 2, 4, 8)
    cache.k[0][:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    cache.keep_rows(torch.tensor([2, 0]))
    assert cache.k[0].shape == (2, 2, 4, 8) and cache.k[0][:, 0, 0, 0].tolist() == [3.0, 1.0]


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[1], []], {}, "prompt 2 is empty"),
        ([[1] * 40], {"max_new_tokens": 10}, "does not fit the model's context of 48"),
        ([[1]], {"temperature": -1.0}, "temperature"),
        ([[1]], {"top_k": 0}, "top_k"),
        ([[1]], {"top_p": 1.5}, "top_p"),
        ([[1]], {"batch_size": 0}, "batch_size"),
        ([[1]], {"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_arguments_are_user_errors(prompts, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate_batch(tiny_model("gpt2"), prompts, **{"max_new_tokens": 4, **kwargs})


def test_nothing_to_generate():
    model = tiny_model("gpt2")
    assert generate_batch(model, [[1, 2], [3]], max_new_tokens=0) == [[], []]
    assert generate_batch(model, [], max_new_tokens=5) == []
