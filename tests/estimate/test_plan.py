"""make_plan, the `lmlab plan` command, hardware specs and scaling-law numbers."""

from __future__ import annotations

import json

import pytest

from lmlab.commands.plan import main
from lmlab.errors import UserError
from lmlab.estimate import scaling
from lmlab.estimate.hardware import load_hardware, parse_hardware_spec
from lmlab.estimate.plan import llama_shape_for, make_plan
from lmlab.model.build import param_count
from lmlab.model.presets import MODEL_PRESETS, get_model_preset

HARDWARE = list(load_hardware())


@pytest.mark.parametrize("model", list(MODEL_PRESETS))
def test_plan_runs_for_every_model_and_hardware_preset(model, capsys):
    for hardware in HARDWARE:
        code = main(["--preset", model, "--hardware", hardware, "--tokens", "1e9"])
        out = capsys.readouterr().out
        assert code in (0, 1)
        assert "parameters" in out
        assert ("does not fit" in out) == (code == 1)


def test_plan_json_has_every_part(capsys):
    main(["--preset", "llama-1.36b", "--hardware", "4xH20", "--tokens", "6e9", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"] == 1_294_159_104
    assert plan["hardware"]["count"] == 4
    assert plan["fits"] is True
    assert plan["training_flops"] == plan["flops_per_token"] * 6e9
    # time = FLOPs / (count * peak * mfu)
    assert plan["hours"] == pytest.approx(plan["training_flops"] / (4 * 148e12 * 0.4) / 3600)
    assert plan["cost_usd"] == pytest.approx(plan["hours"] * 4 * 1.2)
    memory = plan["memory_per_gpu"]
    parts = [v for k, v in memory.items() if k != "total_bytes"]
    assert memory["total_bytes"] == sum(parts)


def test_impossible_plan_says_what_to_change(capsys):
    code = main(["--preset", "llama-1.36b", "--hardware", "rtx4090", "--tokens", "6e9"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 1
    assert last.startswith("does not fit: needs 66.9 GiB per GPU, 24 GiB available")
    assert "try --activation-checkpointing full --micro-batch 1" in last


def test_suggestions_each_make_the_plan_fit():
    cfg = get_model_preset("llama-1.36b")
    plan = make_plan(cfg, tokens=6e9, hardware="a100-40gb")
    assert not plan["fits"]
    assert plan["suggestions"][0].startswith("--micro-batch 2")
    for suggestion in plan["suggestions"]:
        flags = suggestion.split(" (")[0].split()
        change = dict(zip(flags[::2], flags[1::2], strict=True))
        fixed = make_plan(
            cfg,
            tokens=6e9,
            hardware=change.get("--hardware", "a100-40gb"),
            micro_batch=int(change.get("--micro-batch", 8)),
            strategy=change.get("--strategy", "ddp"),
            activation_checkpointing=change.get("--activation-checkpointing", "none"),
        )
        assert fixed["fits"], suggestion


def test_budgets_turn_into_tokens():
    cfg = get_model_preset("gpt2-124m")
    by_hours = make_plan(cfg, budget_hours=2, hardware="2xa100-80gb")
    assert by_hours["hours"] == pytest.approx(2)
    by_usd = make_plan(cfg, budget_usd=6.4, hardware="2xa100-80gb")  # 2 x $1.6 x 2 h
    assert by_usd["tokens"] == pytest.approx(by_hours["tokens"])
    default = make_plan(cfg, hardware="h100")
    assert default["tokens"] == 20 * default["params"]
    with pytest.raises(UserError, match="no known peak"):
        make_plan(cfg, budget_hours=1, hardware="cpu-laptop")
    with pytest.raises(UserError, match="only one"):
        make_plan(cfg, tokens=1e9, budget_hours=1)


def test_hardware_spec_parsing(tmp_path):
    assert parse_hardware_spec("4xH20")[0] == 4
    assert parse_hardware_spec("4xH20")[1].name == "h20"
    assert parse_hardware_spec("h100")[0] == 1
    count, hw = parse_hardware_spec("2xA100-80GB")
    assert (count, hw.memory_gib, hw.peak_flops) == (2, 80, 312e12)
    with pytest.raises(UserError, match="did you mean 'h200'"):
        parse_hardware_spec("h2000")
    with pytest.raises(UserError, match="cannot read"):
        parse_hardware_spec("4 x")
    for hw in load_hardware().values():
        assert hw.price_note.startswith("example, 2026-11")
    own = tmp_path / "hw.yaml"
    own.write_text("hardware:\n  mygpu: {memory_gib: 8, peak_flops: 1.0e14}\n")
    count, hw = parse_hardware_spec("3xmygpu", load_hardware(own))
    assert (count, hw.memory_gib, hw.peak_flops) == (3, 8, 1e14)


def test_bad_inputs_are_user_errors(capsys):
    with pytest.raises(UserError, match="exactly one of --preset"):
        main(["--hardware", "h100"])
    with pytest.raises(UserError, match="unknown model preset"):
        main(["--preset", "tinyy"])
    with pytest.raises(UserError, match="longer than"):
        main(["--preset", "tiny", "--seq-len", "4096"])
    with pytest.raises(UserError, match="mfu"):
        main(["--preset", "tiny", "--mfu", "2"])


def test_params_picks_a_llama_shape_near_the_target():
    for target in (20e6, 350e6, 1.3e9, 7e9):
        cfg = llama_shape_for(target)
        assert cfg.family == "llama"
        assert param_count(cfg) == pytest.approx(target, rel=0.3)


def test_api_comparison_runs(capsys, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text('{"input_usd_per_million": 1, "output_usd_per_million": 2}')
    main(["api", "--tokens-in", "1e6", "--tokens-out", "1e6", "--prices", str(prices), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["api_cost_usd"] == pytest.approx(3.0)
    assert result["local_cost_usd"] > 0
    main(["api", "--tokens-in", "1e6", "--tokens-out", "1e6"])
    assert "EXAMPLE" in capsys.readouterr().out


def test_scaling_law_numbers():
    # L(1e9, 2e10) = 1.69 + 406.4 / 1e9^0.34 + 410.7 / 2e10^0.28
    assert scaling.predicted_loss(1e9, 2e10) == pytest.approx(2.58005, abs=1e-4)
    # C = 1.2e20 = 6 * N * 20 N  ->  N = 1e9, D = 2e10
    n, d = scaling.compute_optimal(1.2e20)
    assert (n, d) == (pytest.approx(1e9), pytest.approx(2e10))
    # approach 3: G = (0.34*406.4 / (0.28*410.7))^(1/0.62) = 1.3447; N = G * (2e19)^(0.28/0.62)
    n, d = scaling.fit_optimal(1.2e20)
    assert n == pytest.approx(7.002e8, rel=1e-3)
    assert 6 * n * d == pytest.approx(1.2e20)
    assert scaling.tokens_per_param_warning(1e9, 2e10) is None
    assert "far below" in scaling.tokens_per_param_warning(1e9, 4e9)
    assert "inference" not in scaling.tokens_per_param_warning(1e9, 1e12)
    assert "serve many tokens" in scaling.tokens_per_param_warning(1e9, 1e12)


def test_plan_method_lora_and_qlora(capsys):
    args = ["--preset", "llama-1.36b", "--hardware", "rtx4090", "--tokens", "1e8"]
    plans = {}
    for method in ("full", "lora", "qlora"):
        main([*args, "--method", method, "--lora-rank", "16", "--micro-batch", "1", "--json"])
        plans[method] = json.loads(capsys.readouterr().out)
    full, lora, qlora = plans["full"], plans["lora"], plans["qlora"]
    assert full["trainable_params"] == full["params"]
    # 18 blocks of q, k, v, o (2304 -> 2304) and gate, up (2304 -> 6144), down (6144 -> 2304)
    per_block = 16 * (4 * (2304 + 2304) + 3 * (2304 + 6144))
    assert lora["trainable_params"] == qlora["trainable_params"] == 18 * per_block
    assert lora["settings"]["method"] == "lora" and lora["settings"]["lora_rank"] == 16
    total = {m: p["memory_per_gpu"]["total_bytes"] for m, p in plans.items()}
    assert total["qlora"] < total["lora"] < total["full"]
    assert not full["fits"] and lora["fits"] and qlora["fits"]
    main([*args, "--method", "qlora"])
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "qlora, rank 8" in out
    assert "weights (NF4 + fp32)" in out


def test_suggestions_keep_the_method():
    cfg = get_model_preset("llama-1.36b")
    plan = make_plan(cfg, tokens=1e8, hardware="rtx4090", method="lora", micro_batch=8)
    assert not plan["fits"]
    flags = plan["suggestions"][0].split(" (")[0].split()
    fixed = make_plan(cfg, tokens=1e8, hardware="rtx4090", method="lora", micro_batch=int(flags[1]))
    assert fixed["fits"]


def test_plan_of_a_mixture_of_experts_shows_total_and_active_parameters(capsys):
    assert main(["--preset", "moe-1b", "--hardware", "8xh100", "--tokens", "2e10"]) == 0
    out = capsys.readouterr().out
    assert "parameters            1,005,650,944 (972,882,944 non-embedding)" in out
    assert "active parameters     301,007,872 per token (29.9%: 2 of 16 experts" in out
    assert "fits to dense models" in out
    plan = make_plan(get_model_preset("moe-1b"), tokens=2e10, hardware="8xh100")
    # time is counted on active FLOPs: about a third of a dense model of the same total size
    dense = make_plan(get_model_preset("llama-1.36b"), tokens=2e10, hardware="8xh100")
    assert plan["flops_per_token"] < 0.5 * dense["flops_per_token"]
    assert plan["memory_per_gpu"]["weights_bytes"] == 4 * plan["params"]
