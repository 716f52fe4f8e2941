"""Training memory per GPU, by component, and the inference KV cache.

Model of lmlab's trainer: parameters are kept in fp32 and mixed precision is autocast, so
per parameter there are 4 bytes of weights, 4 of gradients and 8 of AdamW state (two fp32
moments). The parameter count comes from the model's own closed form
(`lmlab.model.build.param_count`).

Activations are the tensors autograd saves for the backward pass, counted per layer from
the model code (B = micro-batch, T = sequence length, d = d_model, f = d_ff, d_kv =
n_kv_head * head_dim, V = vocab). Elements saved per layer:

- LLaMA: each RMSNorm saves its input, the normalized x and its output (3*B*T*d, twice);
  attention saves rotated q, k and v for SDPA plus SDPA's output and its contiguous copy
  (3*B*T*d + 2*B*T*d_kv; k and v are B*T*d when grouped heads are repeated); SwiGLU
  saves gate, silu(gate), up and their product (4*B*T*f).
- GPT-2: each LayerNorm saves its input and output (2*B*T*d, twice); attention saves the
  qkv projection, SDPA's output and its copy (5*B*T*d); the MLP saves c_fc's output and
  the GELU output (2*B*T*f).
- MoE: norms and attention as LLaMA. Each token enters k experts (k = n_expert_per_token,
  E = n_expert, whatever the routing: B*T*k rows in all), and each row saves the expert's
  input (4*d bytes: one fp32 copy, or two 2-byte autocast casts), SwiGLU's 4*f and the
  expert's output before it is weighted (d). The router keeps its fp32 logits and
  probabilities (2*B*T*E*4 bytes); in mixed precision its input is one more cast copy.

SDPA uses a fused (flash-style) kernel, so no T x T matrix is kept. In fp32 every element
is 4 bytes. Under bf16/fp16 autocast the residual stream and norms stay fp32 and each
linear layer saves a 2-byte cast copy of its input; everything else is 2 bytes. Only the
fp32 numbers are checked against measurements (tests/estimate/test_memory.py, on CPU).

The loss adds a logits buffer: cross-entropy runs in fp32 over B*T*V logits, and at the
start of the backward pass the saved log-softmax, its incoming gradient and the gradient
it produces are alive together: 12 bytes per logit.

Activation checkpointing (`train.activation_checkpointing`, applied by
`lmlab.train.distributed.parallelize`):
- "full": each block keeps only its input (B*T*d, fp32); one block's activations are
  recomputed at a time during the backward pass.
- "selective": the MLP of each block is recomputed, so its d_ff-wide tensors are not kept.
Recomputing starts after the loss's buffer has been freed (the head's backward comes
first), so the peak holds the larger of the two, not both.

Strategies over `world_size` GPUs: "ddp" shards nothing; "zero1" shards the optimizer
state; "fsdp" shards weights, gradients and optimizer state, and gathers one block's full
weights at a time while computing it.

Fine-tuning methods (`method`, as `finetune.method`; LoRA on every attention and MLP
projection, as lmlab.model.lora's "all-linear"):
- "full": every parameter is trained (the above).
- "lora": the weights stay fp32 and frozen; gradients and AdamW state exist only for the
  adapters, rank * (in + out) parameters per adapted linear. Frozen weights change what
  autograd saves: an RMSNorm no longer keeps its normalized x (only a trainable norm
  weight needs it), the final norm's output is not kept (the frozen head needs no weight
  gradient), and the first block's norm keeps nothing of its input, which needs no
  gradient (the embedding is frozen). Each adapter adds its B*T*rank bottleneck.
- "qlora": as lora, with the adapted linears' weights stored in NF4 (lmlab.model.quant):
  half a byte per number plus an fp32 absmax per block of 64; embeddings, norms, biases
  and the head stay fp32. One linear's weight is dequantized at a time (counted in
  `gathered_weights_bytes`).

The total is the plain sum of the parts. With gradient accumulation (several micro-batches
per optimizer step) the gradients of the previous micro-batches are alive while the next
one's activations are, so the sum is the real peak, not a loose bound.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace

from torch import nn

from lmlab.config import (
    ACTIVATION_CHECKPOINTING,
    FINETUNE_METHODS,
    OPTIMIZERS,
    STRATEGIES,
    TRAINING_DTYPES,
)
from lmlab.errors import UserError
from lmlab.model.build import build_model, param_count
from lmlab.model.config import ModelConfig
from lmlab.model.lora import default_targets
from lmlab.model.quant import BLOCK_SIZE

WEIGHT_BYTES = 4  # fp32 parameters (autocast computes in bf16/fp16 from fp32 weights)
GRAD_BYTES = 4  # gradients have the parameters' dtype
ADAM_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32
MUON_BYTES = 4  # Muon's momentum buffer, fp32
LOGIT_BYTES = 12  # fp32 log-softmax saved + its gradient in + gradient out
ABSMAX_BYTES = 4  # NF4: one fp32 scale per BLOCK_SIZE weights


@dataclass
class MemoryEstimate:
    """Bytes per GPU, by component."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    """Activations kept for the backward pass (all of them, or what checkpointing keeps)."""
    logits_bytes: int
    """The fp32 cross-entropy buffer, alive at the start of the backward pass."""
    gathered_weights_bytes: int
    """FSDP only: one block's weights, gathered unsharded while it computes."""
    recompute_bytes: int = 0
    """Checkpointing only: one block's (full) or one MLP's (selective) recomputed activations.
    Recomputing starts after the loss buffer is freed, so the larger of the two counts."""
    dequantized_weight_bytes: int = 0
    """QLoRA only: the one linear weight dequantized (in the compute dtype) while it computes."""

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + max(self.logits_bytes, self.recompute_bytes)
            + self.gathered_weights_bytes
            + self.dequantized_weight_bytes
        )

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _layer_activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str,
    drop_mlp: bool,
    lora_rank: int | None = None,
) -> int:
    """Bytes one block saves for backward (see the module docstring for the counts).

    lora_rank: the weights are frozen and every projection has an adapter of this rank.
    """
    bt = micro_batch * seq_len
    d, f = cfg.d_model, cfg.d_ff
    low = 4 if precision == "fp32" else 2  # bytes of autocast outputs
    mixed = precision != "fp32"
    frozen = lora_rank is not None
    if cfg.family == "moe":  # LoRA does not adapt MoE models (lmlab.model.lora)
        k, n_expert = cfg.n_expert_per_token, cfg.n_expert
        kv_saved = d if cfg.n_kv_head != cfg.n_head else cfg.n_kv_head * cfg.head_dim
        norms = 2 * 3 * d * 4 + (3 + 1) * d * 2 * mixed  # casts: q, k, v and the router
        attn = (3 * d + 2 * kv_saved) * low
        experts = k * (4 * d + 4 * f * low + d * low) + 2 * n_expert * 4
        return bt * (norms + attn + (0 if drop_mlp else experts))
    n_linear = len(default_targets(cfg.family)) + (cfg.family == "gpt2")  # two c_proj
    if cfg.family == "llama":
        d_kv = cfg.n_kv_head * cfg.head_dim
        kv_saved = d if cfg.n_kv_head != cfg.n_head else d_kv
        # norms: input, normalized (unless the norm weight is frozen), output in fp32;
        # autocast saves a cast copy per linear
        norms = 2 * (2 if frozen else 3) * d * 4 + (3 + 2) * d * 2 * mixed
        attn = (3 * d + 2 * kv_saved) * low
        mlp = 0 if drop_mlp else 4 * f * low
        mlp_linears = 3
    else:
        norms = 2 * 2 * d * 4 + 2 * d * 2 * mixed
        attn = 5 * d * low
        mlp = 0 if drop_mlp else 2 * f * low
        mlp_linears = 2
    # each adapter keeps its (B*T, rank) bottleneck for lora_B's gradient
    adapters = 0 if not frozen else (n_linear - drop_mlp * mlp_linears) * lora_rank * low
    return bt * (norms + attn + mlp + adapters)


def activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "fp32",
    activation_checkpointing: str = "none",
    lora_rank: int | None = None,
) -> tuple[int, int]:
    """(kept, recomputed) activation bytes for one micro-batch (logits not included).

    Kept: saved for the backward pass across all blocks. Recomputed: the activations of the
    one block (full) or MLP (selective) being recomputed at a time in the backward pass.
    lora_rank: frozen weights with adapters of that rank on every projection (lora, qlora).
    """
    bt_d_fp32 = micro_batch * seq_len * cfg.d_model * 4
    full_layer = _layer_activation_bytes(
        cfg, micro_batch, seq_len, precision, drop_mlp=False, lora_rank=lora_rank
    )
    # the final norm saves like one more norm, in fp32; with a frozen head its output is not
    # kept, and the first block's norm keeps nothing of its input (no gradient reaches it)
    if lora_rank is None:
        final_norm = bt_d_fp32 * (2 if cfg.family == "gpt2" else 3)
        first_block_input = 0
    else:
        final_norm = bt_d_fp32
        first_block_input = bt_d_fp32
    if activation_checkpointing == "none":
        return cfg.n_layer * full_layer + final_norm - first_block_input, 0
    if activation_checkpointing == "selective":
        kept = _layer_activation_bytes(
            cfg, micro_batch, seq_len, precision, drop_mlp=True, lora_rank=lora_rank
        )
        return cfg.n_layer * kept + final_norm - first_block_input, full_layer - kept
    if activation_checkpointing == "full":
        block_inputs = cfg.n_layer * micro_batch * seq_len * cfg.d_model * 4
        return block_inputs + final_norm, full_layer
    raise UserError(
        f"unknown activation checkpointing {activation_checkpointing!r}; "
        f"choose one of: {', '.join(ACTIVATION_CHECKPOINTING)}"
    )


@functools.lru_cache(maxsize=64)
def _block_linears(cfg_json: str) -> tuple[tuple[int, int, bool], ...]:
    """(in, out, has_bias) of each linear of one block that LoRA adapts ("all-linear")."""
    # one block, built on the meta device: the model's own shapes, no memory, milliseconds
    cfg = ModelConfig(**json.loads(cfg_json))
    targets = default_targets(cfg.family)
    return tuple(
        (m.in_features, m.out_features, m.bias is not None)
        for name, m in build_model(cfg, "meta").named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets and name != "lm_head"
    )


def adapted_linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear LoRA adapts in the model, all blocks."""
    # the key has n_layer 1, so every depth of one shape shares an entry
    one_block = _block_linears(json.dumps({**cfg.to_dict(), "n_layer": 1}, sort_keys=True))
    return [(n_in, n_out) for n_in, n_out, _ in one_block] * cfg.n_layer


@functools.lru_cache(maxsize=64)
def _block_matrix_params(cfg_json: str) -> int:
    """Weights in one block's 2-D parameters, from the model built on the meta device."""
    cfg = ModelConfig(**json.loads(cfg_json))
    return sum(
        p.numel()
        for name, p in build_model(cfg, "meta").named_parameters()
        if p.dim() == 2 and name.split(".")[0] == "blocks"
    )


def muon_matrix_params(cfg: ModelConfig) -> int:
    """Weights Muon trains (lmlab.train.optim.muon_parameters): the blocks' matrices, i.e.
    the attention and MLP projections, and in an MoE the router and every expert's."""
    one_block = _block_matrix_params(json.dumps({**cfg.to_dict(), "n_layer": 1}, sort_keys=True))
    return one_block * cfg.n_layer


def trainable_params(cfg: ModelConfig, method: str = "full", lora_rank: int = 8) -> int:
    """Parameters the optimizer trains: all of them (full), or the adapters' rank * (in + out)."""
    _check_method(method, lora_rank)
    if method == "full":
        return param_count(cfg)
    return sum(lora_rank * (n_in + n_out) for n_in, n_out in adapted_linears(cfg))


def nf4_bytes(numel: int) -> int:
    """Bytes of a weight of `numel` numbers in NF4: 4-bit indices plus absmax per block."""
    blocks = -(-numel // BLOCK_SIZE)
    return blocks * BLOCK_SIZE // 2 + blocks * ABSMAX_BYTES


def weight_bytes(cfg: ModelConfig, method: str = "full", lora_rank: int = 8) -> int:
    """Bytes of every weight, adapters included: fp32, with adapted linears in NF4 for qlora."""
    _check_method(method, lora_rank)
    n_params = param_count(cfg)
    if method == "full":
        return n_params * WEIGHT_BYTES
    adapters = trainable_params(cfg, method, lora_rank)
    if method == "lora":
        return (n_params + adapters) * WEIGHT_BYTES
    quantized = [n_in * n_out for n_in, n_out in adapted_linears(cfg)]
    return (n_params - sum(quantized) + adapters) * WEIGHT_BYTES + sum(map(nf4_bytes, quantized))


def _check_method(method: str, lora_rank: int) -> None:
    if method not in FINETUNE_METHODS:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(FINETUNE_METHODS)}")
    if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1:
        raise UserError(f"LoRA rank must be an integer >= 1, got {lora_rank!r}")


def training_memory(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16",
    activation_checkpointing: str = "none",
    strategy: str = "ddp",
    world_size: int = 1,
    method: str = "full",
    lora_rank: int = 8,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Peak training memory of one GPU (one micro-batch, fp32 parameters).

    method: "full", "lora" or "qlora" (adapters of rank `lora_rank` on every projection).
    optimizer: "adamw" (two fp32 moments per trained parameter) or "muon" (full training:
    one fp32 momentum buffer for each weight of the blocks' matrices, an MoE's router and
    experts included, AdamW's two moments for the rest, as lmlab.train.optim.MuonAdamW
    keeps them).
    """
    _check_method(method, lora_rank)
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if precision not in TRAINING_DTYPES:
        raise UserError(
            f"unknown precision {precision!r}; choose one of: {', '.join(TRAINING_DTYPES)}"
        )
    if micro_batch < 1 or seq_len < 1 or world_size < 1:
        raise UserError("micro-batch, sequence length and GPU count must be at least 1")
    n_trainable = trainable_params(cfg, method, lora_rank)
    weights = weight_bytes(cfg, method, lora_rank)
    grads = n_trainable * GRAD_BYTES
    optimizer_bytes = n_trainable * ADAM_BYTES
    if optimizer == "muon" and method == "full":
        optimizer_bytes -= muon_matrix_params(cfg) * (ADAM_BYTES - MUON_BYTES)
    optimizer = optimizer_bytes
    gathered = 0
    if strategy in ("zero1", "fsdp"):
        optimizer = -(-optimizer // world_size)
    if strategy == "fsdp":
        weights = -(-weights // world_size)
        grads = -(-grads // world_size)
        # one block's weights, from the closed form: a 2-layer model minus a 1-layer one
        one_block = weight_bytes(replace(cfg, n_layer=2), method, lora_rank) - weight_bytes(
            replace(cfg, n_layer=1), method, lora_rank
        )
        gathered = one_block if world_size > 1 else 0
    frozen_rank = None if method == "full" else lora_rank
    kept, recomputed = activation_bytes(
        cfg, micro_batch, seq_len, precision, activation_checkpointing, frozen_rank
    )
    dequantized = 0
    if method == "qlora":
        compute_bytes = 4 if precision == "fp32" else 2
        dequantized = max(n_in * n_out for n_in, n_out in adapted_linears(cfg)) * compute_bytes
    return MemoryEstimate(
        weights_bytes=weights,
        gradients_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=kept,
        logits_bytes=micro_batch * seq_len * cfg.vocab_size * LOGIT_BYTES,
        gathered_weights_bytes=gathered,
        recompute_bytes=recomputed,
        dequantized_weight_bytes=dequantized,
    )


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """Bytes of an inference KV cache: keys and values of every layer and position."""
    return 2 * cfg.n_layer * batch * seq_len * cfg.n_kv_head * cfg.head_dim * dtype_bytes
