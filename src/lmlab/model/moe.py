"""Mixture of experts: LLaMA whose MLPs are sparse layers of SwiGLU experts (Mixtral).

Each MoE layer holds `n_expert` SwiGLU MLPs and a router, a bias-free linear layer that
scores every expert for every token. A token is sent to its `n_expert_per_token` (top-k)
best-scoring experts, and their outputs are summed, weighted by the router's softmax
probabilities renormalised over the chosen k (Jiang et al. 2024). So a model holds
n_expert MLPs per layer but computes only k of them per token: "total" parameters set the
memory, "active" ones the FLOPs (`num_params` vs `num_active_params`, `flops_per_token`).

Attention, RMSNorm, RoPE and the expert MLP are LLaMA's own modules (lmlab.model.llama);
the architecture is `ModelConfig` with family="moe". Parameters map onto Hugging Face
`MixtralForCausalLM` (lmlab.model.hf); an expert's gate/up/down are Mixtral's w1/w3/w2.

Routers left alone collapse: an expert that wins a little more often is trained more,
wins more still, and the others starve. Two losses, returned by every forward pass in
`Routing` and added to the training loss by the trainer (lmlab.train.setup) with the
config's coefficients, push back:
- load balancing (Switch Transformer, Fedus et al. 2021): n_expert * sum_e f_e * P_e,
  where f_e is the number of top-k choices of expert e per token and P_e the mean router
  probability of e. Only P carries a gradient; the loss is smallest when both are
  uniform, where it equals k. f and P are averaged over every layer's tokens together,
  as transformers' `load_balancing_loss_func` does, so the two agree exactly.
- router z-loss (ST-MoE, Zoph et al. 2022): the mean squared log-sum-exp of the router
  logits, which keeps them small and the softmax well-conditioned in low precision.

Token dispatch: the (token, expert) pairs are sorted by expert once per layer, then each
expert gathers its tokens with one index_select and adds its weighted output back with one
index_add_. The Python loop is over experts, never over tokens. Reading the per-expert
counts back to the host costs one device sync per layer; a fused grouped-matmul kernel
would avoid it, at the price of this file's readability.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.config import ModelConfig
from lmlab.model.llama import MLP, Attention, RMSNorm, rope_cos_sin


class LayerRouting(NamedTuple):
    """What one MoE layer's router did with its N tokens (a forward's side output)."""

    choices_per_token: torch.Tensor
    """(n_expert,) top-k choices of each expert / N, no gradient; sums to k."""
    mean_prob: torch.Tensor
    """(n_expert,) mean router probability of each expert over the N tokens; sums to 1."""
    z_loss: torch.Tensor
    """() mean over tokens of logsumexp(router logits)^2."""


class Routing(NamedTuple):
    """What every router did in the model's last forward pass."""

    balance_loss: torch.Tensor
    """() the load-balancing loss (unweighted): k when the load is even, up to n_expert * k."""
    z_loss: torch.Tensor
    """() the router z-loss (unweighted), averaged over layers."""
    expert_load: torch.Tensor
    """(n_layer, n_expert) share of each layer's routed (token, expert) pairs that went to
    each expert, no gradient: 1 / n_expert each when balanced, 0 for a starved expert."""


class SparseMoE(nn.Module):
    """Route each token to its top-k experts and sum their outputs, weighted."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_expert = cfg.n_expert
        self.top_k = cfg.n_expert_per_token
        self.router = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_expert))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerRouting]:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, d_model): the layer treats tokens independently
        logits = self.router(x)  # (N, n_expert)
        # Softmax in fp32: under bf16 autocast small probability differences would decide
        # ties between experts at random.
        probs = logits.float().softmax(dim=-1)  # (N, n_expert)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each, best first
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalised over the k

        # Group the N*k (token, expert) pairs by expert: after a stable sort the pairs of
        # expert 0 come first, then expert 1's, ...; counts say where each group ends.
        pair_expert = chosen.reshape(-1)  # (N*k,): pair p is token p // k
        order = pair_expert.argsort(stable=True)  # (N*k,)
        pair_token = order // self.top_k  # (N*k,) the token of each sorted pair
        pair_weight = weights.reshape(-1)[order]  # (N*k,)
        counts = torch.bincount(pair_expert, minlength=self.n_expert)  # (n_expert,)
        out = torch.zeros_like(x)  # (N, d_model)
        start = 0
        for expert, count in zip(self.experts, counts.tolist(), strict=True):
            # Every expert runs, on zero tokens if none chose it: its weights then still
            # get a (zero) gradient, which DDP expects of every parameter.
            tokens = pair_token[start : start + count]  # (count,)
            y = expert(x.index_select(0, tokens))  # (count, d_model)
            w = pair_weight[start : start + count, None]  # (count, 1), fp32
            out.index_add_(0, tokens, (y * w).to(out.dtype))
            start += count

        routing = LayerRouting(
            choices_per_token=counts.float() / (B * T),
            mean_prob=probs.mean(dim=0),
            z_loss=torch.logsumexp(logits.float(), dim=-1).square().mean(),
        )
        return out.view(B, T, C), routing


class Block(nn.Module):
    """LLaMA's pre-norm block with the MLP replaced: x + attn(norm(x)), x + moe(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SparseMoE(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LayerRouting]:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, attn_mask)
        y, routing = self.mlp(self.mlp_norm(x))
        return x + y, routing


class MoE(nn.Module):
    """Mixture-of-experts language model: LLaMA's embedding, blocks with MoE layers, head.

    The forward pass returns (logits, loss) like every family, loss being the plain
    cross-entropy; the routers' losses of that pass are in `self.routing`, and
    `auxiliary_loss()` weighs them with the config's coefficients for the trainer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "moe":
            raise ValueError(f"MoE needs a config with family='moe', got {cfg.family!r}")
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.routing: Routing | None = None
        """The routers' losses and loads of the last forward pass (None before the first)."""
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As Llama.init_weights: N(0, init_std), unit norms, residual projections (o_proj
        and every expert's down_proj) scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            for expert in block.mlp.experts:
                nn.init.normal_(expert.down_proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache=None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As Llama.forward; also sets `self.routing` for this pass."""
        B, T = idx.shape
        past = kv_cache.seq_len if kv_cache is not None else 0
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
        layers = []
        for block in self.blocks:
            x, layer_routing = block(x, cos, sin, kv_cache, attn_mask)
            layers.append(layer_routing)
        self.routing = combine_routing(layers)
        logits = self.lm_head(self.final_norm(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss

    def auxiliary_loss(self) -> torch.Tensor:
        """The last forward pass's router losses, weighted by the config's coefficients:
        what the trainer adds to the cross-entropy before the backward pass."""
        if self.routing is None:
            raise RuntimeError("auxiliary_loss() is the last forward pass's: run one first")
        cfg = self.config
        return (
            cfg.router_aux_loss_coef * self.routing.balance_loss
            + cfg.router_z_loss_coef * self.routing.z_loss
        )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """All parameters, every expert's included (what memory holds), a tied matrix once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def num_active_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters one token's forward pass reads: k of the n_expert experts per layer."""
        cfg = self.config
        expert = sum(p.numel() for p in self.blocks[0].mlp.experts[0].parameters())
        idle = cfg.n_layer * (cfg.n_expert - cfg.n_expert_per_token) * expert
        return self.num_params(exclude_embeddings) - idle

    def flops_per_token(self, context_length: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6 per active matmul weight, the
        router's included, plus attention (see llama.flops_per_token)."""
        cfg = self.config
        T = cfg.context_length if context_length is None else context_length
        matmul_params = _linear_weights(self)  # the (possibly tied) lm_head included
        idle = cfg.n_expert - cfg.n_expert_per_token  # experts a token skips, per layer
        matmul_params -= cfg.n_layer * idle * _linear_weights(self.blocks[0].mlp.experts[0])
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.d_model * T


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def combine_routing(layers: list[LayerRouting]) -> Routing:
    """The model's Routing from its layers' (same token count in each layer)."""
    n_expert = layers[0].mean_prob.numel()
    choices = torch.stack([r.choices_per_token for r in layers])  # (n_layer, n_expert)
    mean_prob = torch.stack([r.mean_prob for r in layers])  # (n_layer, n_expert)
    # Averaged over all layers' tokens first, then multiplied: transformers' definition.
    balance = n_expert * (choices.mean(dim=0) * mean_prob.mean(dim=0)).sum()
    z_loss = torch.stack([r.z_loss for r in layers]).mean()
    load = choices / choices.sum(dim=1, keepdim=True)
    return Routing(balance_loss=balance, z_loss=z_loss, expert_load=load.detach())


# ---- closed forms: cost of a config without building the model --------------------------


def _expert_params(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.d_ff  # gate, up, down; no biases


def param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Number of parameters `MoE(cfg).num_params(exclude_embeddings)` reports."""
    d, E = cfg.d_model, cfg.n_expert
    d_kv = cfg.n_kv_head * cfg.head_dim
    attn = 2 * d * d + 2 * d * d_kv  # q, o and k, v
    moe = d * E + E * _expert_params(cfg)  # router, experts
    blocks = cfg.n_layer * (2 * d + attn + moe)  # two RMSNorm weights per block
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embedding + blocks + d + head  # + final norm
    return total - embedding if exclude_embeddings else total


def active_param_count(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """`MoE(cfg).num_active_params(exclude_embeddings)`: the experts a token skips left out."""
    idle = cfg.n_layer * (cfg.n_expert - cfg.n_expert_per_token) * _expert_params(cfg)
    return param_count(cfg, exclude_embeddings) - idle


def matmul_param_count(cfg: ModelConfig) -> int:
    """Weights one token multiplies with: attention, the whole router, k experts, the head."""
    d = cfg.d_model
    d_kv = cfg.n_kv_head * cfg.head_dim
    per_layer = (
        2 * d * d + 2 * d * d_kv + d * cfg.n_expert + cfg.n_expert_per_token * _expert_params(cfg)
    )
    return cfg.n_layer * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, context_length: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), counted on active weights only.

    As llama.flops_per_token: 6 FLOPs per matmul weight a token passes through, plus
    12 * d_model * T per layer for attention. A token passes through the router (all
    n_expert columns) and its k experts; the other experts cost it nothing. The sort,
    gathers and scatters of the dispatch move memory and are left out.
    """
    T = cfg.context_length if context_length is None else context_length
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layer * cfg.d_model * T
