"""Model families: config handling, parameter counts, FLOPs, loss, causality."""

from __future__ import annotations

import random
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmlab.errors import UserError
from lmlab.model.build import build_model, flops_per_token, param_count
from lmlab.model.config import ModelConfig
from lmlab.model.presets import MODEL_PRESETS, get_model_preset

CPU_PRESETS = ["ultra-tiny", "tiny", "small", "base", "medium"]
BIG_PRESETS = ["gpt2-124m", "llama-1.36b", "gpt2-1.36b", "llama-134m", "llama-374m", "moe-1b"]


def tiny_config(family: str, **overrides) -> ModelConfig:
    base = dict(family=family, vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=32)
    return ModelConfig(**{**base, **overrides})


def random_config(family: str, rng: random.Random) -> ModelConfig:
    n_kv_head = rng.choice([1, 2, 4])
    n_head = n_kv_head * rng.choice([1, 2, 3]) if family == "llama" else rng.choice([1, 2, 3, 4])
    head_dim = 2 * rng.randint(1, 8)
    return ModelConfig(
        family=family,
        vocab_size=rng.randint(5, 300),
        context_length=rng.randint(1, 64),
        n_layer=rng.randint(1, 4),
        n_head=n_head,
        n_kv_head=n_kv_head if family == "llama" else None,
        d_model=n_head * head_dim,
        d_ff=rng.choice([None, rng.randint(1, 100)]),
        ffn_multiple_of=rng.choice([1, 8, 64, 256]),
        bias=rng.choice([None, True, False]),
        tie_embeddings=rng.choice([None, True, False]),
    )


# ---- config ----------------------------------------------------------------------------


def test_family_defaults_are_resolved_and_stored():
    gpt2 = tiny_config("gpt2")
    assert (gpt2.d_ff, gpt2.bias, gpt2.tie_embeddings, gpt2.n_kv_head) == (128, True, True, 4)
    llama = tiny_config("llama", d_model=2304, n_head=18)
    assert (llama.d_ff, llama.bias, llama.tie_embeddings) == (6144, False, False)
    # 8/3 * 48 = 128, rounded up to a multiple of 256
    assert tiny_config("llama", d_model=48).d_ff == 256
    assert tiny_config("llama", d_model=48, ffn_multiple_of=32).d_ff == 128


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_config_round_trips_through_dict(name):
    cfg = MODEL_PRESETS[name]
    assert ModelConfig(**asdict(cfg)) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert None not in cfg.to_dict().values()


def test_from_dict_rejects_unknown_and_missing_keys_and_coerces_text():
    d = tiny_config("llama").to_dict()
    with pytest.raises(UserError, match="'d_modle'.*did you mean 'd_model'"):
        ModelConfig.from_dict({**d, "d_modle": 3})
    del d["n_layer"]
    with pytest.raises(UserError, match="missing required key.*n_layer"):
        ModelConfig.from_dict(d)
    cfg = ModelConfig.from_dict({**tiny_config("llama").to_dict(), "norm_eps": "1e-6"})
    assert cfg.norm_eps == 1e-6
    with pytest.raises(UserError, match="model.n_layer must be an integer"):
        ModelConfig.from_dict({**tiny_config("llama").to_dict(), "n_layer": "two"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=30, n_head=4), "d_model=30 is not divisible by n_head=4"),
        (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
        (dict(d_model=20, n_head=4), "head_dim=5 .* is odd"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-1), "vocab_size must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(norm_eps=0.0), "norm_eps must be a positive number"),
    ],
)
def test_validate_rejects_bad_llama_configs(overrides, message):
    with pytest.raises(UserError, match=message) as excinfo:
        tiny_config("llama", **overrides).validate()
    assert "\n" not in str(excinfo.value)
    with pytest.raises(UserError, match=message):
        build_model(tiny_config("llama", **overrides), device="meta")


def test_validate_rejects_gqa_for_gpt2_and_unknown_family():
    with pytest.raises(UserError, match="GPT-2 has no grouped-query attention"):
        tiny_config("gpt2", n_kv_head=2).validate()
    with pytest.raises(UserError, match="unknown model family 'bert'"):
        tiny_config("bert")


def test_unknown_preset_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        get_model_preset("tinyy")
    preset = get_model_preset("tiny")
    preset.n_layer = 99  # a copy: the table is untouched
    assert MODEL_PRESETS["tiny"].n_layer != 99


# ---- parameter counts ------------------------------------------------------------------


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_param_count_matches_cpu_presets(name):
    cfg = MODEL_PRESETS[name]
    model = build_model(cfg)
    for exclude in (False, True):
        assert model.num_params(exclude) == param_count(cfg, exclude)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_param_count_matches_random_configs(family):
    rng = random.Random(family)
    for _ in range(20):
        cfg = random_config(family, rng)
        model = build_model(cfg)
        for exclude in (False, True):
            assert model.num_params(exclude) == param_count(cfg, exclude), cfg
        assert model.flops_per_token() == flops_per_token(cfg), cfg


@pytest.mark.parametrize("name", BIG_PRESETS)
def test_big_presets_on_meta_device(name):
    cfg = MODEL_PRESETS[name]
    with torch.device("meta"):
        model = build_model(cfg)
    assert next(model.parameters()).is_meta
    for exclude in (False, True):
        assert model.num_params(exclude) == param_count(cfg, exclude)
    assert model.flops_per_token() == flops_per_token(cfg)
    if name == "gpt2-124m":
        assert model.num_params() == 124_439_808


def test_embedding_conventions():
    gpt2 = build_model(tiny_config("gpt2"))  # tied: the shared matrix is an embedding
    assert gpt2.num_params() - gpt2.num_params(True) == (97 + 32) * 32
    llama = build_model(tiny_config("llama"))  # untied: only the input embedding goes
    assert llama.num_params() - llama.num_params(True) == 97 * 32
    tied = build_model(tiny_config("llama", tie_embeddings=True))
    assert tied.num_params() == llama.num_params() - 97 * 32
    assert tied.num_params(True) == llama.num_params(True) - 97 * 32


# ---- FLOPs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config("gpt2", vocab_size=256, context_length=64, d_model=64),
        tiny_config("llama", vocab_size=256, context_length=64, d_model=64, n_kv_head=2),
    ],
    ids=["gpt2", "llama-gqa"],
)
def test_flops_per_token_matches_flop_counter(cfg):
    """FlopCounterMode does not see CPU's fused SDPA kernel (it counts 0 for it), so we
    measure twice: with the default kernel only the matmuls are counted, and with the
    MATH backend SDPA runs as plain bmm's and the attention term is counted too."""
    torch.manual_seed(0)
    model = build_model(cfg)
    B, T = 2, cfg.context_length
    idx = torch.randint(0, cfg.vocab_size, (B, T))

    def measured_flops_per_token() -> float:
        with FlopCounterMode(display=False) as counter:
            _, loss = model(idx, idx)
            loss.backward()
        return counter.get_total_flops() / (B * T)

    attention = 12 * cfg.n_layer * cfg.d_model * T
    matmuls_only = measured_flops_per_token()
    assert matmuls_only == pytest.approx(model.flops_per_token() - attention, rel=0.02)
    with sdpa_kernel(SDPBackend.MATH):
        everything = measured_flops_per_token()
    assert everything == pytest.approx(model.flops_per_token(), rel=0.02)
    assert model.flops_per_token() == flops_per_token(cfg)
    assert flops_per_token(cfg, 16) == flops_per_token(cfg) - 12 * cfg.n_layer * cfg.d_model * 48


# ---- forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_is_cross_entropy_ignoring_minus_100(family):
    torch.manual_seed(0)
    cfg = tiny_config(family)
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    targets = torch.randint(0, cfg.vocab_size, (3, 16))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, cfg.vocab_size)
    expected = F.cross_entropy(logits.view(-1, cfg.vocab_size), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert model(idx)[1] is None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_future_tokens_do_not_change_past_logits(family):
    torch.manual_seed(0)
    model = build_model(tiny_config(family)).eval()
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    torch.testing.assert_close(model(idx)[0][:, :12], model(changed)[0][:, :12])
    assert not torch.allclose(model(idx)[0][:, 12:], model(changed)[0][:, 12:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_init_scales_residual_projections(family):
    cfg = tiny_config(family, n_layer=8, d_model=256, n_head=4, init_std=0.02)
    model = build_model(cfg)
    out_proj = model.blocks[0].attn.c_proj if family == "gpt2" else model.blocks[0].attn.o_proj
    assert out_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_few_steps_fit_a_batch(family):
    torch.manual_seed(0)
    cfg = tiny_config(family)
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_forward_past_context_is_an_error():
    model = build_model(tiny_config("llama", context_length=8))
    with pytest.raises(ValueError, match="exceeds context_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_replace_needs_d_ff_none_to_rederive():
    cfg = tiny_config("gpt2")
    assert replace(cfg, d_model=64).d_ff == 128  # stored value kept, as documented
    assert replace(cfg, d_model=64, d_ff=None).d_ff == 256
