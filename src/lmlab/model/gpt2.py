"""GPT-2 (Radford et al., 2019): learned positions, pre-LayerNorm, GELU MLP, tied embeddings.

The architecture is described by `ModelConfig` (lmlab.model.config) with family="gpt2".
Parameters map one to one onto Hugging Face `GPT2LMHeadModel` (see lmlab.model.hf); HF
stores its linear weights transposed (Conv1D) and we do not.

Conventions shared with llama.py:
- `forward(idx, targets=None, *, kv_cache=None) -> (logits, loss | None)`.
- `num_params(exclude_embeddings=True)` leaves out the token and position embeddings.
  When the token embedding is tied to the output layer, the shared matrix is left out too
  (it is counted once, as an embedding): the Kaplan et al. (2020) "non-embedding" N.
- `flops_per_token()` is training FLOPs (forward + backward) per token: 6 per weight of
  every matmul, the output layer included, plus 12 * n_layer * d_model * context for the
  attention scores and the weighted sum of values. See `flops_per_token` at the bottom.
- A KV cache is any object with `seq_len` (positions already cached) and
  `update(layer_idx, k, v) -> (k_all, v_all)`; lmlab.generate.kv_cache.KVCache is one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.attention import causal_attention
from lmlab.model.config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (as in GPT-2 and HF)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, kv_cache=None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, d_model)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, d_model)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_head, S, head_dim), S = past + T
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, d_model): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Two linear layers with a GELU between them: the tanh approximation (HF's "gelu_new")
    or, with cfg.gelu="exact", the error-function GELU (HF's "gelu")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate=self.approximate)  # (B, T, d_ff)
        return self.dropout(self.c_proj(h))  # (B, T, d_model)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, kv_cache=None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), kv_cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT2(nn.Module):
    """GPT-2 language model: token + position embeddings, n_layer blocks, final norm, head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "gpt2":
            raise ValueError(f"GPT2 needs a config with family='gpt2', got {cfg.family!r}")
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One matrix reads tokens in and scores them out; saves vocab_size * d_model params.
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, residual projections scaled down.

        Each block adds two outputs (attention, MLP) to the residual stream, so its variance
        grows with 2 * n_layer additions; scaling those projections by 1/sqrt(2 * n_layer)
        keeps the stream's scale independent of depth.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

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
        if positions is None:
            positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))  # (B, T, d_model)
        for block in self.blocks:
            x = block(x, kv_cache, attn_mask)
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
        """Parameters, a tied matrix counted once; optionally without the embeddings."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, context_length: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token at this context length."""
        T = self.config.context_length if context_length is None else context_length
        # Every nn.Linear is a matmul, the (possibly tied) lm_head included.
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_params + 12 * self.config.n_layer * self.config.d_model * T


# ---- closed forms: cost of a config without building the model --------------------------


def param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Number of parameters `GPT2(cfg).num_params(exclude_embeddings)` reports."""
    d, b = cfg.d_model, int(cfg.bias)
    norm = d + b * d  # LayerNorm weight (+ bias)
    attn = d * 3 * d + b * 3 * d + d * d + b * d  # c_attn, c_proj
    mlp = d * cfg.d_ff + b * cfg.d_ff + cfg.d_ff * d + b * d  # c_fc, c_proj
    blocks = cfg.n_layer * (2 * norm + attn + mlp)
    embeddings = cfg.vocab_size * d + cfg.context_length * d  # token + position tables
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embeddings + blocks + norm + head
    return total - embeddings if exclude_embeddings else total


def matmul_param_count(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul: all linear layers plus the output layer.

    Embedding lookups, norms and biases cost no matmul and are left out.
    """
    d = cfg.d_model
    per_layer = 3 * d * d + d * d + 2 * d * cfg.d_ff
    return cfg.n_layer * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, context_length: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), the PaLM (Chowdhery et al. 2022) way.

    - Matmuls: a weight does one multiply-add (2 FLOPs) per token forward and two backward
      (gradient of the input, gradient of the weight): 6 FLOPs per weight per token.
    - Attention: per layer and token, q @ k^T over T keys costs 2 * T * d_model FLOPs and
      the weighted sum of values as much again; x3 for forward + backward gives
      12 * d_model * T. The causal mask is not credited: the dense kernels compute the
      whole T x T square. T is the context length (cfg.context_length by default).
    Norms, activations, softmax and the loss are elementwise and left out (well under 1%).
    """
    T = cfg.context_length if context_length is None else context_length
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layer * cfg.d_model * T
