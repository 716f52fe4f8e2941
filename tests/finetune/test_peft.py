"""PEFT interop: an lmlab LoRA adapter loads in peft on the transformers base, and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmlab.errors import UserError
from lmlab.export.peft import load_peft_adapter, save_peft_adapter
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.lora import LoRAConfig, apply_lora, lora_modules, merge_lora

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

FAMILIES = {
    "gpt2": ModelConfig(
        family="gpt2", vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=32
    ),
    "llama": ModelConfig(
        family="llama",
        vocab_size=97,
        context_length=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=32,
    ),
}


def lora_model(family: str, seed: int = 0, **lora) -> tuple[torch.nn.Module, LoRAConfig]:
    torch.manual_seed(seed)
    model = build_model(FAMILIES[family]).eval()
    cfg = LoRAConfig(**{"rank": 4, "alpha": 8.0, **lora})
    apply_lora(model, cfg)
    with torch.no_grad():  # a trained-looking adapter: B away from zero
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.2)
    return model, cfg


def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_loads_our_adapter_with_our_logits(family, tmp_path: Path):
    from lmlab.model.hf import to_hf

    model, cfg = lora_model(family)
    out = save_peft_adapter(model, cfg, tmp_path / "adapter", base="tiny-base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["fan_in_fan_out"] == (family == "gpt2")

    base = to_hf(merge_lora_off(model))  # the base alone, as a transformers model
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ours = model(ids())[0]
        theirs = peft_model(input_ids=ids()).logits
    assert (ours - theirs).abs().max().item() < 1e-5

    again = build_model(FAMILIES[family]).eval()
    again.load_state_dict(merge_lora_off(model).state_dict())
    loaded = load_peft_adapter(again, out)
    assert loaded.rank == 4 and loaded.alpha == 8.0
    with torch.no_grad():
        assert (again(ids())[0] - ours).abs().max().item() < 1e-6


def merge_lora_off(model: torch.nn.Module) -> torch.nn.Module:
    """The base weights alone: a merged copy with every adapter switched off."""
    from lmlab.model.lora import adapters_disabled

    with adapters_disabled(model):
        return merge_lora(model)


def test_rslora_round_trip(tmp_path: Path):
    from lmlab.model.hf import to_hf

    model, cfg = lora_model("llama", rslora=True, targets=["q_proj", "v_proj"])
    out = save_peft_adapter(model, cfg, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(to_hf(merge_lora_off(model)), str(out)).eval()
    with torch.no_grad():
        assert (model(ids())[0] - peft_model(input_ids=ids()).logits).abs().max().item() < 1e-5


def test_bad_adapters_are_one_line_errors(tmp_path: Path):
    model, cfg = lora_model("llama")
    good = save_peft_adapter(model, cfg, tmp_path / "good")
    with pytest.raises(UserError, match="exists"):
        save_peft_adapter(model, cfg, good)
    with pytest.raises(UserError, match="not a PEFT adapter"):
        load_peft_adapter(build_model(FAMILIES["llama"]), tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="never loads"):
        load_peft_adapter(build_model(FAMILIES["llama"]), pickled)
    wider = ModelConfig(
        family="llama",
        vocab_size=97,
        context_length=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
    )
    with pytest.raises(UserError, match="shape"):
        load_peft_adapter(build_model(wider), good)
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_peft_adapter(build_model(FAMILIES["llama"]), dora)
    with pytest.raises(UserError, match="no LoRA adapters"):
        save_peft_adapter(build_model(FAMILIES["llama"]), cfg, tmp_path / "none")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fresh_adapter_is_exactly_the_base(family):
    torch.manual_seed(0)
    base = build_model(FAMILIES[family]).eval()
    with torch.no_grad():
        expected = base(ids())[0]
    apply_lora(base, LoRAConfig(rank=4))
    with torch.no_grad():
        assert torch.equal(base(ids())[0], expected)


def test_lora_export_of_a_run_loads_in_peft(base_run, tmp_path: Path):
    from lmlab.cli import main as cli_main
    from lmlab.config import build_config
    from lmlab.finetune.task import finetune
    from lmlab.model.hf import to_hf
    from lmlab.runs.load import build_from_checkpoint

    cfg = build_config(
        "finetune-lora",
        overrides=[
            f"finetune.base={base_run}",
            "finetune.data=dsl:flowroll:200",
            f"logging.runs_dir={tmp_path / 'runs'}",
            "finetune.epochs=0",
            "train.max_steps=5",
            "train.lr=1e-2",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "logging.tensorboard=false",
        ],
    )
    run = finetune(cfg, log=lambda *a, **k: None).run_dir
    out = tmp_path / "adapter"
    with pytest.raises(SystemExit) as info:
        cli_main(["lora", "export", str(run), "--out", str(out)])
    assert info.value.code == 0
    ours, _, _, _ = build_from_checkpoint(run)
    base, _, _, _ = build_from_checkpoint(base_run)
    peft_model = peft.PeftModel.from_pretrained(to_hf(base), str(out)).eval()
    tokens = torch.randint(
        0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        diff = (ours(tokens)[0] - peft_model(input_ids=tokens).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_a_peft_adapter_is_a_starting_point(base_run, tmp_path: Path):
    """lmlab finetune --adapter DIR: training starts from the adapter's weights and settings."""
    from lmlab.cli import main as cli_main
    from lmlab.runs.load import build_from_checkpoint

    base, _, _, _ = build_from_checkpoint(base_run)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    apply_lora(base, cfg)
    with torch.no_grad():
        for module in lora_modules(base).values():
            module.lora_B.weight.normal_(0, 0.2)
    adapter = save_peft_adapter(base, cfg, tmp_path / "adapter")
    runs = tmp_path / "runs"
    argv = [
        "finetune",
        "--from",
        str(base_run),
        "--adapter",
        str(adapter),
        "--data",
        "dsl:flowroll:200",
        "--method",
        "lora",
        f"logging.runs_dir={runs}",
        "train.max_steps=2",
        "train.lr=1e-9",
        "train.micro_batch_size=4",
        "train.device=cpu",
        "logging.tensorboard=false",
    ]
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 0
    (run,) = (runs / "finetune-lora").iterdir()
    tuned, _, saved, _ = build_from_checkpoint(run)
    assert (saved.finetune.lora_rank, saved.finetune.lora_targets) == (4, "q_proj,v_proj")
    tokens = torch.randint(
        0, tuned.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():  # lr 1e-9: the adapter is (almost) exactly the one we started from
        assert (tuned(tokens)[0] - base.eval()(tokens)[0]).abs().max().item() < 1e-4
