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

The total is the plain sum of the parts. With gradient accumulation (several micro-batches
per optimizer step) the gradients of the previous micro-batches are alive while the next
one's activations are, so the sum is the real peak, not a loose bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from lmlab.config import ACTIVATION_CHECKPOINTING, STRATEGIES, TRAINING_DTYPES
from lmlab.errors import UserError
from lmlab.model.build import param_count
from lmlab.model.config import ModelConfig

WEIGHT_BYTES = 4  # fp32 parameters (autocast computes in bf16/fp16 from fp32 weights)
GRAD_BYTES = 4  # gradients have the parameters' dtype
ADAM_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32
LOGIT_BYTES = 12  # fp32 log-softmax saved + its gradient in + gradient out


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

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + max(self.logits_bytes, self.recompute_bytes)
            + self.gathered_weights_bytes
        )

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _layer_activation_bytes(
    cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str, drop_mlp: bool
) -> int:
    """Bytes one block saves for backward (see the module docstring for the counts)."""
    bt = micro_batch * seq_len
    d, f = cfg.d_model, cfg.d_ff
    low = 4 if precision == "fp32" else 2  # bytes of autocast outputs
    mixed = precision != "fp32"
    if cfg.family == "llama":
        d_kv = cfg.n_kv_head * cfg.head_dim
        kv_saved = d if cfg.n_kv_head != cfg.n_head else d_kv
        # norms: input, normalized, output in fp32; autocast saves a cast copy per linear
        norms = 2 * 3 * d * 4 + (3 + 2) * d * 2 * mixed
        attn = (3 * d + 2 * kv_saved) * low
        mlp = 0 if drop_mlp else 4 * f * low
    else:
        norms = 2 * 2 * d * 4 + 2 * d * 2 * mixed
        attn = 5 * d * low
        mlp = 0 if drop_mlp else 2 * f * low
    return bt * (norms + attn + mlp)


def activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "fp32",
    activation_checkpointing: str = "none",
) -> tuple[int, int]:
    """(kept, recomputed) activation bytes for one micro-batch (logits not included).

    Kept: saved for the backward pass across all blocks. Recomputed: the activations of the
    one block (full) or MLP (selective) being recomputed at a time in the backward pass.
    """
    full_layer = _layer_activation_bytes(cfg, micro_batch, seq_len, precision, drop_mlp=False)
    # the final norm saves like one more norm, in fp32
    final_norm = micro_batch * seq_len * cfg.d_model * 4 * (3 if cfg.family == "llama" else 2)
    if activation_checkpointing == "none":
        return cfg.n_layer * full_layer + final_norm, 0
    if activation_checkpointing == "selective":
        kept = _layer_activation_bytes(cfg, micro_batch, seq_len, precision, drop_mlp=True)
        return cfg.n_layer * kept + final_norm, full_layer - kept
    if activation_checkpointing == "full":
        block_inputs = cfg.n_layer * micro_batch * seq_len * cfg.d_model * 4
        return block_inputs + final_norm, full_layer
    raise UserError(
        f"unknown activation checkpointing {activation_checkpointing!r}; "
        f"choose one of: {', '.join(ACTIVATION_CHECKPOINTING)}"
    )


def training_memory(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16",
    activation_checkpointing: str = "none",
    strategy: str = "ddp",
    world_size: int = 1,
) -> MemoryEstimate:
    """Peak training memory of one GPU (one micro-batch, AdamW, fp32 parameters)."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if precision not in TRAINING_DTYPES:
        raise UserError(
            f"unknown precision {precision!r}; choose one of: {', '.join(TRAINING_DTYPES)}"
        )
    if micro_batch < 1 or seq_len < 1 or world_size < 1:
        raise UserError("micro-batch, sequence length and GPU count must be at least 1")
    n_params = param_count(cfg)
    weights = n_params * WEIGHT_BYTES
    grads = n_params * GRAD_BYTES
    optimizer = n_params * ADAM_BYTES
    gathered = 0
    if strategy in ("zero1", "fsdp"):
        optimizer = -(-optimizer // world_size)
    if strategy == "fsdp":
        weights = -(-weights // world_size)
        grads = -(-grads // world_size)
        # one block's parameters, from the closed form: a 2-layer model minus a 1-layer one
        one_block = param_count(replace(cfg, n_layer=2)) - param_count(replace(cfg, n_layer=1))
        gathered = one_block * WEIGHT_BYTES if world_size > 1 else 0
    kept, recomputed = activation_bytes(
        cfg, micro_batch, seq_len, precision, activation_checkpointing
    )
    return MemoryEstimate(
        weights_bytes=weights,
        gradients_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=kept,
        logits_bytes=micro_batch * seq_len * cfg.vocab_size * LOGIT_BYTES,
        gathered_weights_bytes=gathered,
        recompute_bytes=recomputed,
    )


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """Bytes of an inference KV cache: keys and values of every layer and position."""
    return 2 * cfg.n_layer * batch * seq_len * cfg.n_kv_head * cfg.head_dim * dtype_bytes
