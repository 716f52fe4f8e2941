from pathlib import Path

import pytest

from lmlab.cli import main as cli_main
from lmlab.config import build_config, load_config, preset_names, save_config
from lmlab.errors import UserError
from lmlab.model.build import param_count
from lmlab.recipes import GPU_RECIPES


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_yaml(tmp_path: Path, name: str):
    cfg = build_config(name)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_layers_override_in_order(tmp_path: Path):
    (tmp_path / "run.yaml").write_text(
        "train:\n  lr: 1e-4\n  max_steps: 50\nmodel:\n  n_layer: 3\n"
    )
    cfg = build_config("tiny", tmp_path / "run.yaml", ["train.max_steps=70"])
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 70 and cfg.model.n_layer == 3
    assert cfg.logging.name == "tiny"


def test_widening_rederives_mlp_unless_given():
    base = build_config("small").model
    wide = build_config("small", overrides=["model.d_model=384"]).model
    assert wide.d_ff > base.d_ff
    fixed = build_config("small", overrides=["model.d_model=384", "model.d_ff=100"]).model
    assert fixed.d_ff == 100


@pytest.mark.parametrize(
    "override,match",
    [
        ("trian.lr=1", "did you mean 'train'"),
        ("train.warmup=5", "did you mean 'warmup_steps'"),
        ("model.n_layers=5", "did you mean 'n_layer'"),
        ("train.max_steps=-1", "max_steps must be positive"),
        ("train.precision=fp8", "must be one of"),
        ("train.seq_len=4096", "longer than model.context_length"),
        ("model.n_kv_head=4", "not divisible by n_kv_head"),
        ("train.device=tpu", "train.device must be"),
        ("train.compile=maybe", "true or false"),
        ("model.gelu=erf", "gelu must be one of|must be one of"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(UserError, match=match):
        build_config("tiny", overrides=[override])


def test_config_show_lists_every_preset_with_its_count(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["config", "show"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in preset_names():
        if name in GPU_RECIPES:  # one row per model size, a column per card
            preset, card = GPU_RECIPES[name]
            assert preset in out.split("GPU recipes")[1] and card in out.split("GPU recipes")[1]
            continue
        assert name in out
        assert f"{param_count(build_config(name).model):,}" in out
    with pytest.raises(SystemExit):
        cli_main(["config", "show", "--preset", "gpt2-124m"])
    out = capsys.readouterr().out
    assert "n_layer: 12" in out and "124,439,808 parameters" in out


def test_main_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in (
        "quickstart",
        "prepare",
        "train",
        "eval",
        "generate",
        "dsl",
        "tokenizer",
        "data",
        "config",
    ):
        assert f"  {command}" in out
    with pytest.raises(SystemExit) as info:
        cli_main(["nosuch"])
    assert info.value.code == 2
