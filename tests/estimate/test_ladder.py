"""The preset ladder: the CPU step between small and medium, and the GPU recipes whose
micro-batches are the planner's answers for their cards."""

from __future__ import annotations

import json
import math

import pytest

from lmlab.commands.config import preset_table
from lmlab.commands.plan import main as plan_main
from lmlab.config import build_config
from lmlab.estimate.hardware import load_hardware
from lmlab.estimate.plan import largest_micro_batch, make_plan
from lmlab.model.build import param_count
from lmlab.model.presets import MODEL_PRESETS
from lmlab.recipes import GPU_CARDS, GPU_LADDER, GPU_RECIPES


def test_the_cpu_ladder_has_a_step_near_5m_between_small_and_medium():
    sizes = [param_count(MODEL_PRESETS[n]) for n in ("small", "base", "medium")]
    assert sizes == sorted(sizes) and 4e6 < sizes[1] < 6e6


def test_the_gpu_ladder_sizes():
    sizes = {n: param_count(MODEL_PRESETS[n]) / 1e6 for n in GPU_LADDER}
    assert [round(v) for v in sizes.values()] == [25, 53, 134, 374]


@pytest.mark.parametrize("name", list(GPU_RECIPES))
def test_each_gpu_recipe_uses_the_planners_micro_batch_and_fills_its_step(name):
    preset, card = GPU_RECIPES[name]
    cfg = build_config(name)
    t, seq_len = cfg.train, cfg.model.context_length
    assert cfg.model == MODEL_PRESETS[preset]
    assert card in load_hardware()
    assert t.micro_batch_size == largest_micro_batch(cfg.model, card) > 0
    assert t.tokens_per_step % (t.micro_batch_size * seq_len) == 0  # a whole accumulation
    assert t.max_steps == math.ceil(20 * param_count(cfg.model) / t.tokens_per_step)
    plan = make_plan(cfg.model, tokens=1e9, hardware=card, micro_batch=t.micro_batch_size)
    assert plan["fits"]
    twice = make_plan(cfg.model, tokens=1e9, hardware=card, micro_batch=2 * t.micro_batch_size)
    assert not twice["fits"] or t.micro_batch_size == 64  # the largest that fits


@pytest.mark.parametrize("name", list(GPU_RECIPES))
def test_plan_prints_each_gpu_recipes_time(name, capsys):
    assert plan_main(["--preset", name]) == 0
    out = capsys.readouterr().out
    assert "time  " in out and "the recipe's" in out
    assert plan_main(["--preset", name, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    t = build_config(name).train
    assert plan["hardware"]["name"] == GPU_RECIPES[name][1]
    assert plan["settings"]["micro_batch"] == t.micro_batch_size
    assert plan["tokens"] == t.max_steps * t.tokens_per_step
    assert plan["hours"] > 0


def test_options_given_override_the_recipe(capsys):
    plan_main(["--preset", "llama-134m-rtx4090", "--hardware", "h100", "--tokens", "1e9", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["hardware"]["name"] == "h100" and plan["tokens"] == 1e9
    assert plan["settings"]["micro_batch"] == 16  # still the recipe's


def test_largest_micro_batch_is_zero_when_nothing_fits():
    assert largest_micro_batch(MODEL_PRESETS["llama-1.36b"], "rtx3080") == 0
    assert largest_micro_batch(MODEL_PRESETS["tiny"], "h100") == 64  # the limit


def test_config_show_lists_the_ladder():
    table = preset_table()
    for preset in GPU_LADDER:
        assert preset in table
    assert all(card in table for card in GPU_CARDS)
    assert "llama-134m-rtx4090" not in table.split("GPU recipes")[0]  # not a row per recipe
