"""LLaMA (Touvron et al., 2023): RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

The architecture is described by `ModelConfig` (lmlab.model.config) with family="llama".
Parameters map one to one onto Hugging Face `LlamaForCausalLM` (see lmlab.model.hf):
RoPE uses HF's "rotate_half" layout, so q/k weights copy across without the permutation
that converting Meta's interleaved checkpoints needs.

Conventions shared with gpt2.py:
- `forward(idx, targets=None, *, kv_cache=None) -> (logits, loss | None)`.
- `num_params(exclude_embeddings=True)` leaves out the input token embedding. The output
  layer (lm_head) is a matmul like any other and stays in, unless it is tied to the
  embedding, in which case the shared matrix is left out (counted once, as an embedding).
- `flops_per_token()` is training FLOPs (forward + backward) per token; see
  `flops_per_token` at the bottom.
- A KV cache is any object with `seq_len` (positions already cached) and
  `update(layer_idx, k, v) -> (k_all, v_all)`; lmlab.generate.kv_cache.KVCache is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.attention import causal_attention
from lmlab.model.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean subtraction and without a bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, as Meta and HF do: a mean of squares in bf16 loses precision.
        # x / sqrt(mean(x^2) + eps), PyTorch's one-call form of it.
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (..., T, head_dim), for absolute positions (..., T).

    Dimension pair (i, i + head_dim/2) rotates by angle position * theta^(-2i/head_dim).
    Computed per forward in fp32 (cheap next to the matmuls) rather than kept as a buffer,
    so the model holds no state besides its parameters and builds fine on the meta device.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim/2,)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, head_dim): both halves of each pair
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + head_dim/2) pair of x (B, n_head, T, head_dim) by its angle."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_head, S, head_dim) -> (B, n_kv_head * n_rep, S, head_dim).

    Query head h reads key/value head h // n_rep, the grouping HF uses.
    """
    if n_rep == 1:
        return x
    B, n_kv_head, S, head_dim = x.shape
    x = x[:, :, None].expand(B, n_kv_head, n_rep, S, head_dim)
    return x.reshape(B, n_kv_head * n_rep, S, head_dim)


class Attention(nn.Module):
    """Grouped-query attention: n_head query heads share n_kv_head key/value heads.

    With n_kv_head == n_head this is plain multi-head attention; fewer K/V heads shrink
    the KV cache by n_head / n_kv_head at a small cost in quality (Ainslie et al. 2023).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        d_kv = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, d_kv, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, d_kv, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.fused_qkv: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Generation only (lmlab.generate.inference): x -> q, k and v side by side, one
        matmul by the three weights stacked. Holds no parameter: never saved or trained."""

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, d_model)
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        if self.fused_qkv is None:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)
            # q: (B, n_head, T, head_dim); k, v: (B, n_kv_head, T, head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # values carry no position
        else:  # the same, with one matmul and one rotation
            qkv = self.fused_qkv(x).view(B, T, H + 2 * KV, D).transpose(1, 2)
            qk = apply_rope(qkv[:, : H + KV], cos, sin)  # (B, H + KV, T, head_dim)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
        if kv_cache is not None:
            # The cache keeps rotated keys and only n_kv_head heads: that is GQA's saving.
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_kv_head, S, head_dim)
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, n_head, S, head_dim)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, d_model): heads side by side
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fused_gate_up: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Generation only, as Attention.fused_qkv: x -> gate and up side by side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, d_ff) each
        else:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down_proj(F.silu(gate) * up))  # (B, T, d_model)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """LLaMA language model: token embedding, n_layer blocks, final RMSNorm, output layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "llama":
            raise ValueError(f"Llama needs a config with family='llama', got {cfg.family!r}")
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) weights, zero biases, unit norms; residual projections scaled down.

        HF initializes every LLaMA weight with the same std; we also scale the two
        projections that write into the residual stream (o_proj, down_proj) by
        1/sqrt(2 * n_layer), as GPT-2 does, so the stream's scale does not grow with depth.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache=None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids idx (B, T); with targets, also the mean
        cross-entropy over positions whose target is not -100.

        positions (B, T) and attn_mask (B, 1, T, S) are for batches of left-padded prompts
        (lmlab.generate.batch): each row's own positions, and which keys each query reads.
        By default positions continue the cache and attention is causal."""
        B, T = idx.shape
        past = kv_cache.seq_len if kv_cache is not None else 0  # positions already cached
        if past + T > self.config.context_length:
            raise ValueError(
                f"sequence of {past + T} positions exceeds context_length "
                f"{self.config.context_length}"
            )
        x = self.drop(self.tok_emb(idx))  # (B, T, d_model)
        if positions is None:
            positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if cos.dim() == 3:  # per-row positions: (B, T, head_dim) -> (B, 1, T, head_dim)
            cos, sin = cos[:, None], sin[:, None]
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, attn_mask)
        x = self.final_norm(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # Loss in fp32: under bf16 autocast the log-softmax over a large vocab loses bits.
            loss = F.cross_entropy(
                logits.float().reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied matrix counted once; optionally without the input embedding."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, context_length: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token at this context length."""
        T = self.config.context_length if context_length is None else context_length
        # Every nn.Linear is a matmul, the (possibly tied) lm_head included.
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_params + 12 * self.config.n_layer * self.config.d_model * T


# ---- closed forms: cost of a config without building the model --------------------------


def param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Number of parameters `Llama(cfg).num_params(exclude_embeddings)` reports."""
    d, b = cfg.d_model, int(cfg.bias)
    d_kv = cfg.n_kv_head * cfg.head_dim
    attn = 2 * d * d + 2 * d * d_kv + b * (2 * d + 2 * d_kv)  # q, o and k, v (+ biases)
    mlp = 3 * d * cfg.d_ff + b * (2 * cfg.d_ff + d)  # gate, up, down (+ biases)
    blocks = cfg.n_layer * (2 * d + attn + mlp)  # two RMSNorm weights per block
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embedding + blocks + d + head  # + final norm
    return total - embedding if exclude_embeddings else total


def matmul_param_count(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul: all linear layers plus the output layer.

    Embedding lookups, norms and biases cost no matmul and are left out.
    """
    d = cfg.d_model
    d_kv = cfg.n_kv_head * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * d_kv + 3 * d * cfg.d_ff
    return cfg.n_layer * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, context_length: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), the PaLM (Chowdhery et al. 2022) way.

    - Matmuls: a weight does one multiply-add (2 FLOPs) per token forward and two backward
      (gradient of the input, gradient of the weight): 6 FLOPs per weight per token.
    - Attention: per layer and token, q @ k^T over T keys costs 2 * T * d_model FLOPs and
      the weighted sum of values as much again; x3 for forward + backward gives
      12 * d_model * T. GQA does not change it (every query head still scores every key)
      and the causal mask is not credited: dense kernels compute the whole T x T square.
      T is the context length (cfg.context_length by default).
    Norms, RoPE, activations, softmax and the loss are elementwise and left out.
    """
    T = cfg.context_length if context_length is None else context_length
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layer * cfg.d_model * T
