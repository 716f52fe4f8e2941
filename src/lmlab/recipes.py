"""Training recipes: a model preset plus training settings that suit it (data, not schema).

Each recipe is a nested dict of config sections, merged over the defaults by
`lmlab.config.build_config`; every model preset is also usable as a recipe with default
training settings. `lmlab config show` lists them.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "quickstart": {
        "model": {"preset": "tiny", "context_length": 64},
        "train": {
            "max_steps": 1400,
            "micro_batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 50,
            "weight_decay": 0.0,
        },
        "eval": {"interval": 350, "batches": 10},
        "checkpoint": {"interval": 700},
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
        "model": {
            "preset": "tiny",
            "context_length": 64,
            "n_layer": 4,
            "n_head": 4,
            "d_model": 128,
            "d_ff": 384,
        },
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
RECIPE_DESCRIPTIONS = {
    "quickstart": "tiny LLaMA for the FLOWROLL quickstart (CPU, a few minutes)",
    "shakespeare-char-reference": "the classic CPU demo: GPT 4x128, context 64, batch 12, 2000 steps",
    "shakespeare-char-fast": "lmlab's faster recipe for the same data: LLaMA 4x128, 1100 steps at lr 3e-3",
    "workshop-base": "tiny LLaMA on the shipped Shakespeare sample: the base of `lmlab quickstart --finetune`",
    "finetune-full": "lmlab finetune --method full: every weight, lr 5e-5, 3 epochs",
    "finetune-lora": "lmlab finetune --method lora: rank-8 adapters on a frozen base, lr 1e-3, 3 epochs",
    "finetune-dpo": "lmlab finetune --method dpo: preference pairs, full weights, beta 0.1, lr 1e-5, 1 epoch",
    "finetune-dpo-lora": "lmlab finetune --method dpo-lora: preference pairs on LoRA adapters, lr 5e-4, 1 epoch",
}


def is_finetune_recipe(name: str) -> bool:
    """A recipe for `lmlab finetune` (it has no model: the base model brings its own)."""
    return name in RECIPES and "finetune" in RECIPES[name]
