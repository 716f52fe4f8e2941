"""Training recipes: a model preset plus training settings that suit it (data, not schema).

Each recipe is a nested dict of config sections, merged over the defaults by
`lmlab.config.build_config`; every model preset is also usable as a recipe with default
training settings. `lmlab config show` lists them.
"""

from __future__ import annotations

from typing import Any

# The char-level Shakespeare recipes' LLaMA: the reference's width and depth (4 x 128),
# context 64, an MLP of 384 (LLaMA's default 512 would cost 1.5x GPT-2's at this width).
_CHAR_LLAMA = {
    "preset": "tiny",
    "context_length": 64,
    "n_layer": 4,
    "n_head": 4,
    "d_model": 128,
    "d_ff": 384,
}

RECIPES: dict[str, dict[str, Any]] = {
    # FLOWROLL programs in about two minutes of a 2-core CPU. Muon with a stable lr and a
    # linear decay over the last 40% of the steps, and two blocks instead of the tiny
    # preset's four (cheaper steps, so more of them fit): exact match 36% -> 73.5%
    # in less time than the AdamW/cosine recipe it replaced (BENCHMARKS.md, "lmlab quickstart").
    "quickstart": {
        "model": {"preset": "tiny", "context_length": 64, "n_layer": 2},
        "train": {
            "max_steps": 1600,
            "micro_batch_size": 32,
            "optimizer": "muon",
            "lr": 6e-3,
            "schedule": "wsd",
            "decay_fraction": 0.4,
            "warmup_steps": 10,
            "weight_decay": 0.0,
        },
        "eval": {"interval": 400, "batches": 10},
        "checkpoint": {"interval": 800},
        "logging": {"interval": 80},  # a line every ~7 s: 20 lines, not 160
    },
    # The widely used CPU demo recipe (char-level tinyshakespeare), at exactly its shape.
    "shakespeare-char-reference": {
        "model": {
            "preset": "gpt2-124m",
            "vocab_size": 65,
            "context_length": 64,
            "n_layer": 4,
            "n_head": 4,
            "d_model": 128,
            "bias": False,
            "gelu": "exact",  # its MLP is nn.GELU(): the error-function GELU
        },
        "train": {
            "max_steps": 2000,
            "micro_batch_size": 12,
            "lr": 1e-3,
            "warmup_steps": 100,
            "beta2": 0.99,
            "weight_decay": 0.1,
        },
        "eval": {"interval": 250, "batches": 20},
    },
    # lmlab's recipe for the same data: a LLaMA of the same width and depth with a narrower
    # MLP, trained 3x hotter for fewer steps; val loss 1.88 in well under two minutes on a
    # 2-core laptop (BENCHMARKS.md).
    "shakespeare-char-fast": {
        "model": dict(_CHAR_LLAMA),
        "train": {
            "max_steps": 1100,
            "micro_batch_size": 12,
            "lr": 3e-3,
            "warmup_steps": 50,
            "beta2": 0.99,
            "weight_decay": 0.1,
            "grad_clip": 0.0,
        },
        "eval": {"interval": 100, "batches": 20},
        "checkpoint": {"interval": 0},
        "logging": {"interval": 50},
    },
    # The least wall clock to the reference's final val loss (1.886 on the last 10% of the
    # text) on a 2-core CPU: Muon, a 10-step warmup, a stable lr then a linear decay over
    # the second half (wsd), and two blocks instead of four. 21-30 s to that loss where the
    # reference recipe took 120-165 s in the same benchmark runs (BENCHMARKS.md;
    # docs/training.md says why).
    "shakespeare-char-speedrun": {
        "model": {**_CHAR_LLAMA, "n_layer": 2},
        "train": {
            "max_steps": 350,
            "micro_batch_size": 12,
            "optimizer": "muon",
            "lr": 6e-3,
            "schedule": "wsd",
            "warmup_steps": 10,
            "decay_fraction": 0.5,
            "beta2": 0.99,
            "weight_decay": 0.1,
            "grad_clip": 0.0,
        },
        "eval": {"interval": 50, "batches": 20},
        "checkpoint": {"interval": 0},
        "logging": {"interval": 50},
    },
    # The base model of the fine-tuning workshop (`lmlab quickstart --finetune`): general
    # text (the shipped Shakespeare sample), a couple of minutes on a laptop CPU.
    "workshop-base": {
        "model": {"preset": "tiny", "context_length": 128},
        "train": {"max_steps": 600, "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 50},
        "eval": {"interval": 200, "batches": 10},
        "checkpoint": {"interval": 0},
        "logging": {"interval": 50},
    },
    # Fine-tuning recipes: no model section (the base model brings its own), the training
    # settings that suit each method. Small batches, a short warmup, a few epochs.
    "finetune-full": {
        "train": {"lr": 5e-5, "warmup_steps": 10, "micro_batch_size": 8, "weight_decay": 0.0},
        "eval": {"interval": 50, "batches": 10},
        "checkpoint": {"interval": 200},
        "finetune": {"method": "full", "objective": "sft", "epochs": 3.0},
    },
    "finetune-lora": {
        "train": {"lr": 1e-3, "warmup_steps": 10, "micro_batch_size": 8, "weight_decay": 0.0},
        "eval": {"interval": 50, "batches": 10},
        "checkpoint": {"interval": 200},
        "finetune": {"method": "lora", "objective": "sft", "epochs": 3.0, "lora_rank": 8},
    },
    "finetune-dpo": {
        "train": {"lr": 1e-5, "warmup_steps": 5, "micro_batch_size": 8, "weight_decay": 0.0},
        "eval": {"interval": 25, "batches": 10},
        "checkpoint": {"interval": 200},
        "finetune": {"method": "full", "objective": "dpo", "epochs": 1.0, "dpo_beta": 0.1},
    },
    "finetune-dpo-lora": {
        "train": {"lr": 5e-4, "warmup_steps": 5, "micro_batch_size": 8, "weight_decay": 0.0},
        "eval": {"interval": 25, "batches": 10},
        "checkpoint": {"interval": 200},
        "finetune": {"method": "lora", "objective": "dpo", "epochs": 1.0, "dpo_beta": 0.1},
    },
}
# The GPU ladder: one recipe per model size and card, e.g.
# `lmlab train --preset llama-134m-rtx4090 --data DIR`, named SIZE-CARD. Each trains for
# the compute-optimal 20 tokens per parameter at a fixed number of tokens per step; the
# micro-batch is the largest power of two (up to 64) that the planner's memory estimate
# fits on one card (lmlab.estimate.plan.largest_micro_batch; tests/estimate/test_ladder.py
# keeps the two equal), and gradient accumulation makes up the rest of the step.
# `lmlab plan --preset llama-134m-rtx4090` prints the recipe's memory, time and cost.
GPU_CARDS = ("t4", "rtx3080", "rtx4090", "a100-80gb", "h100")
"""Hardware presets (lmlab.estimate's hardware.yaml) with a recipe for every ladder size."""
GPU_LADDER: dict[str, dict[str, Any]] = {
    # preset: tokens per step, steps (20 tokens/param), peak lr, micro-batch per card
    "llama-25m": dict(tokens_per_step=262_144, max_steps=1901, lr=1e-3, micro=(16, 16, 32, 64, 64)),
    "llama-53m": dict(tokens_per_step=262_144, max_steps=4061, lr=8e-4, micro=(16, 8, 32, 64, 64)),
    "llama-134m": dict(tokens_per_step=524_288, max_steps=5116, lr=6e-4, micro=(8, 4, 16, 64, 64)),
    "llama-374m": dict(tokens_per_step=524_288, max_steps=14262, lr=3e-4, micro=(4, 1, 8, 32, 32)),
}
GPU_RECIPES: dict[str, tuple[str, str]] = {}
"""Recipe name -> (model preset, hardware preset)."""
for _preset, _rung in GPU_LADDER.items():
    for _card, _micro in zip(GPU_CARDS, _rung["micro"], strict=True):
        GPU_RECIPES[f"{_preset}-{_card}"] = (_preset, _card)
        RECIPES[f"{_preset}-{_card}"] = {
            "model": {"preset": _preset},
            "train": {
                "max_steps": _rung["max_steps"],
                "tokens_per_step": _rung["tokens_per_step"],
                "micro_batch_size": _micro,
                "lr": _rung["lr"],
                "warmup_steps": max(100, _rung["max_steps"] // 50),
                "device": "cuda",
            },
            "eval": {"interval": 250, "batches": 20},
            "checkpoint": {"interval": 500},
        }

RECIPE_DESCRIPTIONS = {
    "quickstart": "LLaMA 2x96 with Muon for the FLOWROLL quickstart (CPU, about two minutes)",
    "shakespeare-char-reference": "the classic CPU demo: GPT 4x128, context 64, batch 12, 2000 steps",
    "shakespeare-char-fast": "lmlab's faster recipe for the same data: LLaMA 4x128, 1100 steps at lr 3e-3",
    "shakespeare-char-speedrun": "the reference's final loss in a fifth of its time: LLaMA 2x128, Muon, wsd, 350 steps",
    "workshop-base": "tiny LLaMA on the shipped Shakespeare sample: the base of `lmlab quickstart --finetune`",
    "finetune-full": "lmlab finetune --method full: every weight, lr 5e-5, 3 epochs",
    "finetune-lora": "lmlab finetune --method lora: rank-8 adapters on a frozen base, lr 1e-3, 3 epochs",
    "finetune-dpo": "lmlab finetune --method dpo: preference pairs, full weights, beta 0.1, lr 1e-5, 1 epoch",
    "finetune-dpo-lora": "lmlab finetune --method dpo-lora: preference pairs on LoRA adapters, lr 5e-4, 1 epoch",
}


for _name, (_preset, _card) in GPU_RECIPES.items():
    _rung = GPU_LADDER[_preset]
    RECIPE_DESCRIPTIONS[_name] = (
        f"{_preset} on one {_card}: {_rung['tokens_per_step']:,} tokens/step, "
        f"{_rung['max_steps']:,} steps (20 tokens/param), lr {_rung['lr']:g}"
    )


def is_finetune_recipe(name: str) -> bool:
    """A recipe for `lmlab finetune` (it has no model: the base model brings its own)."""
    return name in RECIPES and "finetune" in RECIPES[name]
