"""LoRA (lmlab.model.lora) on tiny models of both families, and PEFT adapters both ways.

Every base parameter is randomized first (norm weights and biases included) and adapters
get a nonzero B, so an adapter on the wrong layer, or a tensor copied to the wrong place,
would change the logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmlab.errors import UserError
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    base_state_dict,
    default_targets,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)

VOCAB, CONTEXT = 101, 24
CONFIGS = {
    "gpt2": dict(family="gpt2"),  # GPT-2 ties its head to the token embedding by default
    "gpt2-untied": dict(family="gpt2", tie_embeddings=False),
    "gpt2-no-bias": dict(family="gpt2", bias=False),
    "llama": dict(family="llama"),
    "llama-gqa-tied": dict(family="llama", n_head=4, n_kv_head=2, tie_embeddings=True),
}


def make_config(name: str, **changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, context_length=CONTEXT, n_layer=2, n_head=4, d_model=32)
    return ModelConfig(**{**base, **CONFIGS[name], **changes})


@torch.no_grad()
def randomize(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def base_model(name: str, **changes) -> torch.nn.Module:
    model = build_model(make_config(name, **changes)).eval()
    randomize(model.parameters(), seed=0)
    return model


def lora_model(name: str, **lora) -> tuple[torch.nn.Module, LoRAConfig]:
    """A randomized base with adapters whose B is away from zero (a trained-looking adapter)."""
    model = base_model(name)
    cfg = LoRAConfig(**{"rank": 4, "alpha": 8.0, **lora})
    torch.manual_seed(0)  # lora_A's init
    apply_lora(model, cfg)
    randomize([m.lora_B.weight for m in lora_modules(model).values()], seed=1)
    return model, cfg


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model holding `model`'s base weights (its adapters left out)."""
    plain = build_model(model.config).eval()
    plain.load_state_dict(base_state_dict(model), strict=True)
    return plain


@torch.no_grad()
def logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(idx)[0]


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# ---- the LoRA model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_adapter_is_exactly_the_base(name, idx):
    model = base_model(name)
    expected = logits(model, idx)
    apply_lora(model, LoRAConfig(rank=4))
    assert torch.equal(logits(model, idx), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_names_and_base_state_dict(name):
    model = base_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = apply_lora(model, LoRAConfig(rank=4))
    family = model.config.family
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    if family == "llama":
        per_block = [f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        per_block += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    expected = [f"blocks.{i}.{p}" for i in range(2) for p in per_block]
    assert sorted(replaced) == sorted(expected) and list(lora_modules(model)) == replaced
    keys = set(model.state_dict())
    first = expected[0]
    assert {f"{first}.base.weight", f"{first}.lora_A.weight", f"{first}.lora_B.weight"} <= keys
    assert not isinstance(model.lm_head, LoRALinear)
    assert not any(m.training for m in model.modules())  # eval stays eval: no live dropout
    if model.config.tie_embeddings:  # the tie survives: the head was never touched
        assert model.lm_head.weight is model.tok_emb.weight
    # The base under its original names: equal to the model before LoRA, loadable strictly.
    base = base_state_dict(model)
    assert base.keys() == before.keys()
    assert all(torch.equal(base[k], before[k]) for k in before)
    build_model(model.config).load_state_dict(base, strict=True)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied"])
def test_only_adapters_train(name, idx):
    model, cfg = lora_model(name)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    expected = sum(
        cfg.rank * (m.base.in_features + m.base.out_features) for m in lora_modules(model).values()
    )
    assert trainable_parameters(model) == expected
    base_before = {k: v.clone() for k, v in base_state_dict(model).items()}
    adapters_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    # No weight decay: every change below comes from a gradient.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, base_before[k]) for k, v in base_state_dict(model).items())
    after = lora_state_dict(model)
    assert all(not torch.equal(after[k], adapters_before[k]) for k in after)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_gives_the_lora_logits(name, idx):
    model, _ = lora_model(name)
    merged = merge_lora(model)
    assert type(merged) is type(model) and not lora_modules(merged)
    assert merged.state_dict().keys() == build_model(model.config).state_dict().keys()
    assert all(p.requires_grad for p in merged.parameters())
    if model.config.tie_embeddings:
        assert merged.lm_head.weight is merged.tok_emb.weight
    diff = (logits(merged, idx) - logits(model, idx)).abs().max().item()
    assert diff < 1e-5, diff
    assert lora_modules(model)  # the LoRA model itself is unchanged
    # The adapters did something: merged weights are not the base's.
    assert not torch.equal(logits(merged, idx), logits(plain_copy(model), idx))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_adapters_disabled_is_the_base_and_restores(name, idx):
    model, _ = lora_model(name)
    with_adapters = logits(model, idx)
    base = logits(plain_copy(model), idx)
    with adapters_disabled(model) as same:
        assert same is model
        assert torch.equal(logits(model, idx), base)
    assert torch.equal(logits(model, idx), with_adapters)
    # Restored on an exception too, and a module switched off before stays off.
    first = next(iter(lora_modules(model).values()))
    first.enabled = False
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("inside")
    assert [m.enabled for m in lora_modules(model).values()] == [False] + [True] * (
        len(lora_modules(model)) - 1
    )


def test_lora_linear():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.5)
    assert layer.lora_A.weight.shape == (3, 8) and layer.lora_B.weight.shape == (12, 3)
    assert layer.lora_A.weight.abs().sum() > 0 and not layer.lora_B.weight.any()
    assert layer.scaling == 2.0
    assert LoRALinear(base, rank=4, alpha=6.0, rslora=True).scaling == 3.0  # alpha / sqrt(r)
    randomize([layer.lora_B.weight], seed=2)
    x = torch.randn(2, 5, 8)  # (B, T, in)
    expected = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-6)
        assert torch.allclose(layer(x), x @ layer.merged_weight().T + base.bias, atol=1e-6)
        layer.enabled = False
        assert torch.equal(layer(x), base(x))
        layer.enabled = True
        layer.train()  # dropout acts on the adapter's input in training only
        assert not torch.equal(layer(x), expected)


def test_targets_select_modules():
    model = base_model("llama")
    names = apply_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj"]))
    assert names == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    # GPT-2's c_proj names both the attention output and the MLP output, as in PEFT.
    names = apply_lora(base_model("gpt2"), LoRAConfig(rank=2, targets="c_proj"))
    assert names == [f"blocks.{i}.{p}.c_proj" for i in range(2) for p in ("attn", "mlp")]
    assert default_targets("gpt2") == ("c_attn", "c_proj", "c_fc")
    cfg = LoRAConfig(rank=2, alpha=4.0, dropout=0.1, targets=["q_proj"], rslora=True)
    assert LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_lora_state_dict_round_trip_and_strictness(idx):
    model, _ = lora_model("llama")
    other = plain_copy(model)
    apply_lora(other, LoRAConfig(rank=4, alpha=8.0))
    load_lora_state_dict(other, lora_state_dict(model))
    assert torch.equal(logits(other, idx), logits(model, idx))
    adapters = lora_state_dict(model)
    key = next(iter(adapters))
    with pytest.raises(UserError, match="1 missing"):
        load_lora_state_dict(other, {k: v for k, v in adapters.items() if k != key})
    with pytest.raises(UserError, match="1 unexpected"):
        load_lora_state_dict(
            other, {**adapters, "blocks.9.attn.q_proj.lora_A.weight": adapters[key]}
        )
    narrow = plain_copy(model)
    apply_lora(narrow, LoRAConfig(rank=2))
    with pytest.raises(UserError, match="shape") as error:
        load_lora_state_dict(narrow, adapters)
    one_line(error)
    with pytest.raises(UserError, match="apply_lora"):
        load_lora_state_dict(plain_copy(model), adapters)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LoRAConfig(rank=0), "rank must be an integer >= 1"),
        (lambda: LoRAConfig(rank=2.5), "rank must be"),
        (lambda: LoRAConfig(alpha=0), "alpha must be a number > 0"),
        (lambda: LoRAConfig(alpha=math.nan), "alpha must be"),
        (lambda: LoRAConfig(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (lambda: LoRAConfig(dropout=1.0), "dropout must be"),
        (lambda: LoRAConfig(targets=[]), "targets must be a non-empty list"),
        (lambda: LoRAConfig.from_dict({"rnak": 4}), "did you mean 'rank'"),
        (lambda: default_targets("bert"), "does not know model family 'bert'"),
        (
            lambda: apply_lora(base_model("gpt2"), LoRAConfig(targets=["q_proj"])),
            "'q_proj' is not a module of a gpt2 model.*; it has: c_attn, c_proj, c_fc",
        ),
        (
            lambda: apply_lora(base_model("llama"), LoRAConfig(targets=["q_prj"])),
            "did you mean 'q_proj'",
        ),
        (lambda: apply_lora(base_model("llama"), LoRAConfig(targets=["lm_head"])), "lm_head"),
        (lambda: apply_lora(lora_model("llama")[0], LoRAConfig()), "already has LoRA adapters"),
    ],
)
def test_bad_lora_inputs_are_one_line_errors(make, match):
    with pytest.raises(UserError, match=match) as error:
        make()
    one_line(error)


# ---- PEFT adapters -----------------------------------------------------------------------

PEFT_CASES = {
    "gpt2-tied": ("gpt2", {}),
    "gpt2-untied-c_proj": ("gpt2-untied", {"targets": ["c_proj"]}),
    "llama-gqa-tied": ("llama-gqa-tied", {}),
    "llama-rslora-qv-dropout": (
        "llama",
        {"targets": ["q_proj", "v_proj"], "rslora": True, "dropout": 0.1},
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_round_trip(case, idx, tmp_path: Path):
    peft = pytest.importorskip("peft")
    from lmlab.export.peft import load_peft_adapter, save_peft_adapter
    from lmlab.model.hf import to_hf

    name, lora = PEFT_CASES[case]
    model, cfg = lora_model(name, **lora)
    ours = logits(model, idx)
    out = save_peft_adapter(model, cfg, tmp_path / "adapter", base="org/tiny-base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["fan_in_fan_out"] == (model.config.family == "gpt2")  # Conv1D: (in, out)
    assert config["base_model_name_or_path"] == "org/tiny-base"

    # PEFT on the same base as a transformers model (fp32, eval mode: no dropout).
    peft_model = peft.PeftModel.from_pretrained(to_hf(plain_copy(model)), str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=idx).logits
    diff = (theirs - ours).abs().max().item()
    assert diff < 1e-5, diff

    # And back: the folder as a starting point for an lmlab model.
    fresh = plain_copy(model)
    loaded = load_peft_adapter(fresh, out)
    assert loaded.rank == cfg.rank and loaded.alpha == cfg.alpha
    assert loaded.rslora == cfg.rslora and loaded.dropout == cfg.dropout
    assert set(loaded.resolve_targets(fresh.config.family)) == set(
        cfg.resolve_targets(fresh.config.family)
    )
    assert torch.equal(logits(fresh, idx), ours)


def test_bad_peft_folders_are_one_line_errors(tmp_path: Path):
    pytest.importorskip("peft")
    from lmlab.export.peft import load_peft_adapter, save_peft_adapter

    model, cfg = lora_model("llama")
    good = save_peft_adapter(model, cfg, tmp_path / "good")
    config = json.loads((good / "adapter_config.json").read_text())

    def folder(name: str, config_text: str | None, weights: bytes | None = None) -> Path:
        path = tmp_path / name
        path.mkdir()
        if config_text is not None:
            (path / "adapter_config.json").write_text(config_text)
        if weights is not None:
            (path / "adapter_model.safetensors").write_bytes(weights)
        return path

    weights = (good / "adapter_model.safetensors").read_bytes()
    pickled = folder("pickled", json.dumps(config))
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    bad = [
        (tmp_path / "missing", "not a PEFT adapter folder"),
        (folder("empty", None), "not a PEFT adapter folder"),
        (folder("json", "{"), "not valid JSON"),
        (folder("list", "[1]"), "not a PEFT adapter config"),
        (folder("ia3", json.dumps({**config, "peft_type": "IA3"})), "LoRA only"),
        (folder("dora", json.dumps({**config, "use_dora": True}), weights), "use_dora"),
        (folder("rank", json.dumps({**config, "r": 0}), weights), "rank must be"),
        (folder("alpha", json.dumps({**config, "lora_alpha": "x"}), weights), "r and lora_alpha"),
        (pickled, "only a pickled adapter_model.bin"),
        (folder("corrupt", json.dumps(config), b"not safetensors"), "could not be read"),
    ]
    for path, match in bad:
        target = plain_copy(model)
        with pytest.raises(UserError, match=match) as error:
            load_peft_adapter(target, path)
        one_line(error)
        assert not lora_modules(target)

    # Another base: wider, deeper, shallower, another family. Refused before any change.
    for changes, match in [
        (dict(d_model=64), "made for another base model"),
        (dict(n_layer=3), "lacks 14 adapter tensor"),
        (dict(n_layer=1), "is on no layer of this model"),
    ]:
        target = base_model("llama", **changes)
        with pytest.raises(UserError, match=match) as error:
            load_peft_adapter(target, good)
        one_line(error)
        assert not lora_modules(target) and all(p.requires_grad for p in target.parameters())
    with pytest.raises(UserError, match="not a module of a gpt2 model") as error:
        load_peft_adapter(base_model("gpt2"), good)
    one_line(error)
    with pytest.raises(UserError, match="already has LoRA adapters"):
        load_peft_adapter(model, good)

    # Saving: a config that does not describe the adapters, credentials, no adapters, exists.
    for args, match in [
        ((model, LoRAConfig(rank=8, alpha=8.0), tmp_path / "a"), "does not describe"),
        ((model, LoRAConfig(rank=4, alpha=4.0), tmp_path / "b"), "scaling"),
        ((model, cfg, tmp_path / "c", "https://user:token@example.com/base"), "credentials"),
        ((plain_copy(model), cfg, tmp_path / "d"), "no LoRA adapters"),
        ((model, cfg, good), "exists"),
    ]:
        with pytest.raises(UserError, match=match) as error:
            save_peft_adapter(*args)
        one_line(error)
        assert "token" not in str(error.value)
