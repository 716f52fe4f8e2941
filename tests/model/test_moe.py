"""The moe family: its dispatch against a plain reference, its cost formulas against real
counts, and parity with transformers' MixtralForCausalLM (fp32, CPU, tiny random configs)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmlab.errors import UserError
from lmlab.generate.sampling import generate
from lmlab.model.build import active_param_count, build_model, flops_per_token, param_count
from lmlab.model.config import ModelConfig
from lmlab.model.moe import MoE

VOCAB, CONTEXT = 101, 24


def moe_config(**overrides) -> ModelConfig:
    base = dict(
        family="moe",
        vocab_size=VOCAB,
        context_length=CONTEXT,
        n_layer=2,
        n_head=4,
        d_model=32,
        d_ff=48,
        n_expert=4,
        n_expert_per_token=2,
    )
    return ModelConfig(**{**base, **overrides})


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms included, so a misplaced tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and cannot stall in an OpenMP barrier waiting for
    a thread another process's load has descheduled (on this project's 2 shared cores, a
    40-token generation took 26.7 s on two threads beside one busy process, 0.07 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))


# ---- the model on its own --------------------------------------------------------------


def reference_moe_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, each weighted by its renormalised top-k router
    probability (zero for experts a token did not choose): slow, and obviously right."""
    probs = layer.router(x).float().softmax(dim=-1)  # (B, T, E)
    top, chosen = probs.topk(layer.top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
    outputs = torch.stack([expert(x) for expert in layer.experts], dim=-2)  # (B, T, E, d)
    return (gates[..., None] * outputs).sum(dim=-2)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_sorted_dispatch_matches_the_dense_reference(top_k):
    model = build_model(moe_config(n_expert_per_token=top_k))
    randomize(model, seed=0)
    layer = model.blocks[0].mlp
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    out, routing = layer(x)
    torch.testing.assert_close(out, reference_moe_layer(layer, x), rtol=1e-5, atol=1e-6)
    assert routing.choices_per_token.sum().item() == pytest.approx(top_k)
    assert routing.mean_prob.sum().item() == pytest.approx(1.0)


def test_every_expert_gets_a_gradient_even_when_no_token_chose_it():
    model = build_model(moe_config(n_expert=8, n_expert_per_token=1))
    x = torch.randint(0, VOCAB, (1, 2))  # 2 tokens, 8 experts: most are idle
    _, loss = model(x, x)
    (loss + model.auxiliary_loss()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_routing_and_auxiliary_loss(idx):
    cfg = moe_config(router_aux_loss_coef=0.02, router_z_loss_coef=0.001)
    model = build_model(cfg)
    model(idx)
    routing = model.routing
    assert routing.expert_load.shape == (cfg.n_layer, cfg.n_expert)
    torch.testing.assert_close(routing.expert_load.sum(dim=1), torch.ones(cfg.n_layer))
    # Near-uniform routers at initialisation: the balance loss is near its minimum, k.
    assert routing.balance_loss.item() == pytest.approx(cfg.n_expert_per_token, rel=0.1)
    expected = 0.02 * routing.balance_loss + 0.001 * routing.z_loss
    assert model.auxiliary_loss().item() == pytest.approx(expected.item())


def test_kv_cache_greedy_equals_full_recompute():
    model = build_model(moe_config(context_length=48)).eval()
    randomize(model, seed=3)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    cached = list(generate(model, prompt, 30, temperature=0.0, use_cache=True))
    full = list(generate(model, prompt, 30, temperature=0.0, use_cache=False))
    assert cached == full


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_expert_per_token=5), "n_expert_per_token=5 is more than n_expert=4"),
        (dict(n_expert=0), "n_expert must be a positive integer"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef must be a number >= 0"),
        (dict(bias=True), "family 'moe' has no biases"),
    ],
)
def test_validate_rejects_bad_moe_configs(overrides, message):
    with pytest.raises(UserError, match=message):
        moe_config(**overrides).validate()


def test_config_round_trips_through_dict():
    cfg = moe_config(router_z_loss_coef=0.001)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ---- cost: closed forms against the built model ----------------------------------------


def random_moe_config(rng: random.Random) -> ModelConfig:
    n_kv_head = rng.choice([1, 2])
    n_head = n_kv_head * rng.choice([1, 2])
    n_expert = rng.randint(1, 6)
    return moe_config(
        vocab_size=rng.randint(5, 200),
        context_length=rng.randint(1, 40),
        n_layer=rng.randint(1, 3),
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=n_head * 2 * rng.randint(1, 4),
        d_ff=rng.randint(1, 40),
        n_expert=n_expert,
        n_expert_per_token=rng.randint(1, n_expert),
        tie_embeddings=rng.choice([True, False]),
    )


def test_closed_forms_match_the_model_for_random_configs():
    rng = random.Random(17)
    for _ in range(20):
        cfg = random_moe_config(rng)
        model = build_model(cfg, device="meta")
        for exclude in (False, True):
            assert model.num_params(exclude) == param_count(cfg, exclude), cfg
            assert model.num_active_params(exclude) == active_param_count(cfg, exclude), cfg
        assert model.flops_per_token() == flops_per_token(cfg), cfg


def test_active_params_are_total_params_when_every_expert_is_used():
    cfg = moe_config(n_expert=4, n_expert_per_token=4)
    assert active_param_count(cfg) == param_count(cfg)
    dense = moe_config(n_expert=1, n_expert_per_token=1)
    llama = ModelConfig(**{**dense.to_dict(), "family": "llama"})
    # One expert is a LLaMA MLP; the MoE adds only the router's d_model weights per layer.
    assert param_count(dense) == param_count(llama) + dense.n_layer * dense.d_model
    assert active_param_count(llama) == param_count(llama)


def test_flops_per_token_matches_flop_counter():
    """Measured as the dense families are (tests/model/test_models.py): the MATH backend
    makes attention plain bmm's the counter sees. Whatever the routing, N tokens make N*k
    expert rows, so the count is exact up to the elementwise work it does not see."""
    cfg = moe_config(vocab_size=256, context_length=64, d_model=64, d_ff=96, n_expert=8)
    torch.manual_seed(0)
    model = build_model(cfg)
    B, T = 2, cfg.context_length
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        (loss + model.auxiliary_loss()).backward()
    measured = counter.get_total_flops() / (B * T)
    assert measured == pytest.approx(model.flops_per_token(), rel=0.02)
    assert model.flops_per_token() == flops_per_token(cfg)
    # k of 8 experts: far fewer FLOPs than a model computing all of them
    all_experts = flops_per_token(moe_config(**{**cfg.to_dict(), "n_expert_per_token": 8}))
    assert flops_per_token(cfg) < 0.5 * all_experts


# ---- parity with transformers' MixtralForCausalLM --------------------------------------

transformers = pytest.importorskip("transformers")

PARITY_CONFIGS = {
    "top2": dict(),
    "gqa-top1-8": dict(n_kv_head=2, n_expert=8, n_expert_per_token=1),
    "tied-top3-theta": dict(
        n_kv_head=1, n_expert_per_token=3, tie_embeddings=True, rope_theta=500.0
    ),
}


def hf_forward(hf_model, idx: torch.Tensor):
    with torch.no_grad():
        return hf_model(input_ids=idx, output_router_logits=True)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_to_hf_logits_and_aux_loss_match(name, idx):
    from lmlab.model.hf import to_hf

    model = build_model(moe_config(**PARITY_CONFIGS[name])).eval()
    randomize(model, seed=0)
    hf_model = to_hf(model)
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        logits, _ = model(idx)
    out = hf_forward(hf_model, idx)
    assert (logits - out.logits).abs().max().item() < 1e-5
    # transformers' aux_loss is the unweighted balance loss (router_aux_loss_coef is applied
    # only where it adds it to a loss); ours is model.routing.balance_loss.
    assert abs(model.routing.balance_loss.item() - out.aux_loss.item()) < 1e-6
    # With labels, HF's loss is cross-entropy + coef * aux: ours, + auxiliary_loss().
    # HF shifts the labels inside; ours takes targets already shifted (-100: no target).
    targets = torch.cat((idx[:, 1:], torch.full_like(idx[:, :1], -100)), dim=1)
    with torch.no_grad():
        hf_loss = hf_model(input_ids=idx, labels=idx, output_router_logits=True).loss
        _, cross_entropy = model(idx, targets)
    assert abs((cross_entropy + model.auxiliary_loss()).item() - hf_loss.item()) < 1e-6


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_from_hf_logits_match(name, idx):
    from lmlab.model.hf import from_hf, to_hf_config

    cfg = moe_config(**PARITY_CONFIGS[name])
    hf_model = transformers.MixtralForCausalLM(to_hf_config(cfg)).eval()
    randomize(hf_model, seed=0)
    model = from_hf(hf_model)
    assert isinstance(model, MoE)
    with torch.no_grad():
        logits, _ = model(idx)
    out = hf_forward(hf_model, idx)
    assert (logits - out.logits).abs().max().item() < 1e-5
    assert abs(model.routing.balance_loss.item() - out.aux_loss.item()) < 1e-6
    assert model.config.to_dict() == cfg.to_dict()


def test_greedy_generation_with_kv_cache_matches_transformers():
    from lmlab.model.hf import to_hf

    model = build_model(moe_config(n_kv_head=2, context_length=64)).eval()
    randomize(model, seed=4)
    hf_model = to_hf(model)
    prompt = torch.tensor([[5, 17, 3, 42, 8, 99]])
    ours = list(generate(model, prompt, 40, temperature=0.0, use_cache=True))
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    assert ours == theirs[0, prompt.size(1) :].tolist()
    assert len(set(ours)) > 3  # a real sequence, not one repeated token


def test_saved_folder_has_per_expert_names_and_round_trips(tmp_path, idx):
    """transformers 5 holds experts fused in memory but saves Mixtral's per-expert names;
    a saved folder loads back into MixtralForCausalLM and from there into lmlab."""
    from lmlab.model.hf import from_hf, to_hf

    cfg = moe_config(router_z_loss_coef=0.001)
    model = build_model(cfg).eval()
    randomize(model, seed=5)
    to_hf(model).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w1.weight")
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    for j in range(cfg.n_expert):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.0.block_sparse_moe.experts.{j}.{w}.weight" in names
    assert torch.equal(w1, model.blocks[1].mlp.experts[3].gate_proj.weight)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["lmlab_router_z_loss_coef"] == 0.001
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    back = from_hf(reloaded)
    assert back.config == cfg
    with torch.no_grad():
        assert torch.equal(model(idx)[0], back(idx)[0])


def test_from_hf_rejects_unsupported_mixtral_variants():
    from lmlab.model.hf import from_hf_config, to_hf_config

    hf_config = to_hf_config(moe_config())
    hf_config.sliding_window = 8
    with pytest.raises(UserError, match="sliding attention window of 8"):
        from_hf_config(hf_config)
    hf_config = to_hf_config(moe_config())
    hf_config.router_jitter_noise = 0.1
    with pytest.raises(UserError, match="router_jitter_noise"):
        from_hf_config(hf_config)


def test_expert_weights_in_fused_layout_match_per_expert_names():
    """The fused layout's chunk order (w1 rows, then w3) is what transformers computes:
    swapping gate and up would change the logits, so parity above checks it; here the
    layouts convert into each other losslessly."""
    from lmlab.model.hf import _fuse_experts, _split_experts, param_pairs

    cfg = moe_config()
    model = build_model(cfg)
    ours = model.state_dict()
    table = {hf: ours[name] for name, hf, _ in param_pairs(cfg)}
    back = _split_experts(cfg, _fuse_experts(cfg, table))
    assert back.keys() == table.keys()
    assert all(torch.equal(back[k], table[k]) for k in table)


def test_softmax_is_fp32_under_bf16_autocast():
    model = build_model(moe_config())
    idx = torch.randint(0, VOCAB, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    assert model.routing.balance_loss.dtype == torch.float32
