"""Named model sizes. Parameter counts are what `num_params()` reports (tests check them).

The small LLaMA presets are for CPU teaching runs: vocab_size 512 is a placeholder that
training replaces with the tokenizer's vocabulary, and their d_ff is rounded to a multiple
of 32 rather than 256, which would bloat the MLP of a 48-wide model.
"""

from __future__ import annotations

import dataclasses
import difflib

from lmlab.errors import UserError
from lmlab.model.config import ModelConfig


def _teaching(n_layer: int, n_head: int, d_model: int) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=512,
        context_length=256,
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        ffn_multiple_of=32,
    )


def _moe(context_length: int, vocab_size: int, **sizes: int) -> ModelConfig:
    return ModelConfig(
        family="moe",
        vocab_size=vocab_size,
        context_length=context_length,
        n_expert_per_token=2,
        **sizes,
    )


def _gpu(n_layer: int, n_head: int, d_model: int) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=32000,
        context_length=1024,
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
    )


MODEL_PRESETS: dict[str, ModelConfig] = {
    # LLaMA, vocab 512, context 256 (parameter counts at vocab 512)
    "ultra-tiny": _teaching(n_layer=2, n_head=4, d_model=48),  # 104,688 params
    "tiny": _teaching(n_layer=4, n_head=6, d_model=96),  # 541,536
    "small": _teaching(n_layer=6, n_head=6, d_model=192),  # 2,853,312
    "base": _teaching(n_layer=6, n_head=8, d_model=256),  # 5,082,368
    "medium": _teaching(n_layer=8, n_head=5, d_model=320),  # 10,245,440
    # The GPU ladder: LLaMA, vocab 32,000, context 1024, heads of 64. The two larger share
    # GPT-2 small's and medium's shapes (untied embeddings make them larger than GPT-2's).
    # Recipes per card: lmlab.recipes.GPU_RECIPES.
    "llama-25m": _gpu(n_layer=10, n_head=4, d_model=256),  # 24,909,056
    "llama-53m": _gpu(n_layer=6, n_head=8, d_model=512),  # 53,221,888
    "llama-134m": _gpu(n_layer=12, n_head=12, d_model=768),  # 134,105,856
    "llama-374m": _gpu(n_layer=24, n_head=16, d_model=1024),  # 373,867,520
    # Mixtures of experts (family "moe", Mixtral's layout), top-2 routing. Total parameters
    # (all experts: memory) / active (what one token computes with: FLOPs).
    # Teaching size, vocab 512, context 256: 1,971,328 total / 791,680 active.
    "moe-tiny": _moe(256, 512, n_layer=4, n_head=4, d_model=128, d_ff=128, n_expert=8),
    # GPU size, 16 fine-grained experts of d_ff 512: 1,005,650,944 total / 301,007,872 active.
    "moe-1b": _moe(2048, 32000, n_layer=32, n_head=16, d_model=1024, d_ff=512, n_expert=16),
    # The original GPT-2 small: 124,439,808 params (tied embeddings, position table included).
    "gpt2-124m": ModelConfig(
        family="gpt2",
        vocab_size=50257,
        context_length=1024,
        n_layer=12,
        n_head=12,
        d_model=768,
    ),
    # 1.3B-class pair for GPU throughput / cost comparisons.
    "llama-1.36b": ModelConfig(  # 1,294,159,104 params; d_ff = 6144
        family="llama",
        vocab_size=32000,
        context_length=2048,
        n_layer=18,
        n_head=18,
        n_kv_head=18,
        d_model=2304,
    ),
    # 2432 = 19 * 128 is not divisible by 18, so this preset has 19 heads of 128; the head
    # count does not change the parameter count: 1,405,338,496 params.
    "gpt2-1.36b": ModelConfig(
        family="gpt2",
        vocab_size=50257,
        context_length=2048,
        n_layer=18,
        n_head=19,
        d_model=2432,
    ),
}


def get_model_preset(name: str) -> ModelConfig:
    """A copy of the named preset (edit it freely); UserError with a suggestion if unknown."""
    if name not in MODEL_PRESETS:
        close = difflib.get_close_matches(name, MODEL_PRESETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"unknown model preset {name!r}; {hint}available: {', '.join(MODEL_PRESETS)}"
        )
    return dataclasses.replace(MODEL_PRESETS[name])
