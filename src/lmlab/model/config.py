"""`ModelConfig`: the architecture of a model, shared by every family.

Family defaults (d_ff, bias, weight tying, n_kv_head) are resolved once, at construction,
and stored: a config always holds concrete values, so `ModelConfig(**asdict(cfg)) == cfg`
and a config written to YAML reads back unchanged. The flip side: derived fields do not
follow later edits. `dataclasses.replace(cfg, d_model=512)` keeps the old d_ff; pass
`d_ff=None` (and `n_kv_head=None`) as well to re-derive them.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lmlab.errors import UserError
from lmlab.typed_dict import from_dict

Family = Literal["gpt2", "llama", "moe"]
FAMILIES: tuple[str, ...] = typing.get_args(Family)
Gelu = Literal["tanh", "exact"]
GELUS: tuple[str, ...] = typing.get_args(Gelu)
# `--quantize` of the inference commands (lmlab.model.quant.quantize_for_inference)
QUANTIZATIONS: tuple[str, ...] = ("int8",)


def default_d_ff(family: str, d_model: int, ffn_multiple_of: int) -> int:
    """The MLP hidden size a family uses when `d_ff` is not given."""
    if family == "gpt2":
        return 4 * d_model
    # SwiGLU has three matrices instead of two; 2/3 of 4*d_model keeps the parameter count
    # of a 4x GELU MLP (Shazeer 2020). Rounding up to a multiple keeps matmuls aligned.
    hidden = -(-8 * d_model // 3)  # ceil(8/3 * d_model) in integers
    return -(-hidden // ffn_multiple_of) * ffn_multiple_of


@dataclass
class ModelConfig:
    """Architecture of one model: which family, and its sizes."""

    family: Family
    """"gpt2" (learned positions, LayerNorm, GELU), "llama" (RoPE, RMSNorm, SwiGLU, GQA) or
    "moe" (LLaMA whose MLPs are sparse mixtures of SwiGLU experts, as Mixtral)."""
    vocab_size: int
    """Number of token ids the embedding and the output layer cover."""
    context_length: int
    """Longest sequence the model accepts (size of GPT-2's position table)."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Number of query heads; head_dim = d_model // n_head."""
    d_model: int
    """Width of the residual stream."""
    n_kv_head: int | None = None
    """Number of key/value heads (None -> n_head). Fewer than n_head is grouped-query attention."""
    d_ff: int | None = None
    """MLP hidden size (None -> gpt2: 4*d_model; llama: 8/3*d_model rounded up to ffn_multiple_of).
    For moe, the hidden size of each expert."""
    ffn_multiple_of: int = 256
    """LLaMA rounds its default d_ff up to a multiple of this."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm (gpt2) / RMSNorm (llama)."""
    rope_theta: float = 10000.0
    """RoPE base: the longest rotary wavelength is about 2*pi*rope_theta positions (llama only)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    bias: bool | None = None
    """Biases in linear layers and LayerNorm (None -> gpt2: True, llama: False)."""
    tie_embeddings: bool | None = None
    """Share the token embedding with the output layer (None -> gpt2: True, llama: False)."""
    gelu: Gelu = "tanh"
    """gpt2 only: the MLP's GELU. "tanh": the tanh approximation GPT-2 was trained with (HF's
    "gelu_new"); "exact": x * Phi(x) with the error function (HF's "gelu", PyTorch's
    nn.GELU()), which the reference CPU recipe uses and which runs ~3x faster on AVX2 CPUs."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init; residual projections get /sqrt(2*n_layer)."""
    n_expert: int = 8
    """moe only: experts in each MoE layer."""
    n_expert_per_token: int = 2
    """moe only: experts each token is routed to (top-k); their weights renormalised to sum to 1."""
    router_aux_loss_coef: float = 0.01
    """moe only: weight of the load-balancing loss added to the training loss (Switch: 0.01)."""
    router_z_loss_coef: float = 0.0
    """moe only: weight of the router z-loss added to the training loss (ST-MoE: 0.001; 0 = off)."""

    def __post_init__(self) -> None:
        # Resolve family defaults now and store them, so the config round-trips unchanged.
        if self.family not in FAMILIES:
            raise UserError(
                f"unknown model family {self.family!r}; choose one of: {', '.join(FAMILIES)}"
            )
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.tie_embeddings is None:
            self.tie_embeddings = self.family == "gpt2"
        if self.d_ff is None:
            if not isinstance(self.ffn_multiple_of, int) or self.ffn_multiple_of <= 0:
                raise UserError(
                    f"ffn_multiple_of must be a positive integer, got {self.ffn_multiple_of!r}"
                )
            self.d_ff = default_d_ff(self.family, self.d_model, self.ffn_multiple_of)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    def validate(self) -> None:
        """Raise UserError, with a one-line message, if the sizes cannot make a model."""
        for name in (
            "vocab_size",
            "context_length",
            "n_layer",
            "n_head",
            "n_kv_head",
            "d_model",
            "d_ff",
            "ffn_multiple_of",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.gelu not in GELUS:
            raise UserError(f"gelu must be one of {', '.join(GELUS)}, not {self.gelu!r}")
        if self.gelu != "tanh" and self.family != "gpt2":
            raise UserError(f"gelu={self.gelu} is for family gpt2; {self.family} uses SwiGLU")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise UserError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head so that head_dim = d_model / n_head is a whole number"
            )
        if self.n_head % self.n_kv_head:
            raise UserError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                "each key/value head must serve the same number of query heads"
            )
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise UserError(
                f"GPT-2 has no grouped-query attention: set n_kv_head={self.n_head} "
                "(= n_head) or use family 'llama'"
            )
        if self.family == "moe":
            self._validate_moe()
        if self.family in ("llama", "moe") and self.head_dim % 2:
            raise UserError(
                f"head_dim={self.head_dim} (d_model / n_head) is odd, but RoPE rotates pairs "
                "of dimensions; choose d_model and n_head so head_dim is even"
            )

    def _validate_moe(self) -> None:
        for name in ("n_expert", "n_expert_per_token"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.n_expert_per_token > self.n_expert:
            raise UserError(
                f"n_expert_per_token={self.n_expert_per_token} is more than n_expert="
                f"{self.n_expert}: a token cannot be routed to more experts than there are"
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserError(f"{name} must be a number >= 0, got {value!r}")
        if self.bias:
            raise UserError("family 'moe' has no biases (as Mixtral): set bias=false")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (resolved values), ready for YAML or JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a dict such as `to_dict()` wrote; unknown or missing keys are UserErrors.

        Numbers given as strings are converted, because YAML 1.1 (PyYAML) reads `1e-5`
        as the string "1e-5".
        """
        return from_dict(cls, d, "model")
