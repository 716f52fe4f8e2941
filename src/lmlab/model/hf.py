"""Convert models to and from Hugging Face `transformers` (GPT2LMHeadModel, LlamaForCausalLM,
MixtralForCausalLM).

Both directions copy tensors by name through one table (`param_pairs`), so they cannot
drift apart. Differences the table absorbs:
- HF GPT-2 uses Conv1D, whose weight is stored (in, out): the transpose of nn.Linear's.
  Its q/k/v projection is fused as `c_attn` in q, k, v order, the same as ours.
- HF GPT-2 always has biases. A bias-free lmlab GPT-2 exports with zero biases, which
  compute the same function, and `"lmlab_bias": false` in its config.json, so it imports
  back as bias=False (its zero biases checked and dropped).
- LLaMA needs no permutation: our RoPE uses HF's rotate_half layout.
- Mixtral: the table names each expert's weights as Mixtral checkpoints do,
  `block_sparse_moe.experts.N.w1/w3/w2` (our gate/up/down) and `block_sparse_moe.gate`
  (our router): what `save_pretrained` writes, and transformers 4.x's modules. transformers
  5 holds the experts fused in memory, `mlp.experts.gate_up_proj` (n_expert, 2 * d_ff,
  d_model: each expert's w1 rows, then its w3 rows) and `mlp.experts.down_proj`, and
  converts to the per-expert names when it saves; `_fuse_experts` / `_split_experts`
  convert between the two layouts when the installed version uses the fused one.

transformers is imported inside the functions: it is an optional dependency, and slow
to import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars while transformers saves or loads a local model (a moment's work,
    inside an lmlab command that prints its own result); put back as they were after."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()


MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
"""Our SwiGLU expert's projections -> Mixtral's names for them."""


def param_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(lmlab name, HF name, transposed) for every parameter of a model with config cfg."""
    pairs: list[tuple[str, str, bool]] = []

    def add(ours: str, theirs: str, transposed: bool = False, bias: bool = False) -> None:
        pairs.append((f"{ours}.weight", f"{theirs}.weight", transposed))
        if bias:  # biases are vectors: never transposed
            pairs.append((f"{ours}.bias", f"{theirs}.bias", False))

    b = cfg.bias
    if cfg.family == "gpt2":
        add("tok_emb", "transformer.wte")
        add("pos_emb", "transformer.wpe")
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
            add(f"{ours}.attn_norm", f"{theirs}.ln_1", bias=b)
            add(f"{ours}.attn.c_attn", f"{theirs}.attn.c_attn", transposed=True, bias=b)
            add(f"{ours}.attn.c_proj", f"{theirs}.attn.c_proj", transposed=True, bias=b)
            add(f"{ours}.mlp_norm", f"{theirs}.ln_2", bias=b)
            add(f"{ours}.mlp.c_fc", f"{theirs}.mlp.c_fc", transposed=True, bias=b)
            add(f"{ours}.mlp.c_proj", f"{theirs}.mlp.c_proj", transposed=True, bias=b)
        add("final_norm", "transformer.ln_f", bias=b)
    else:
        add("tok_emb", "model.embed_tokens")
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}", f"model.layers.{i}"
            add(f"{ours}.attn_norm", f"{theirs}.input_layernorm")
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                add(f"{ours}.attn.{name}", f"{theirs}.self_attn.{name}", bias=b)
            add(f"{ours}.mlp_norm", f"{theirs}.post_attention_layernorm")
            if cfg.family == "llama":
                for name in ("gate_proj", "up_proj", "down_proj"):
                    add(f"{ours}.mlp.{name}", f"{theirs}.mlp.{name}", bias=b)
                continue
            moe = f"{theirs}.block_sparse_moe"
            add(f"{ours}.mlp.router", f"{moe}.gate")
            for j in range(cfg.n_expert):
                for name, w in MIXTRAL_EXPERT_NAMES.items():
                    add(f"{ours}.mlp.experts.{j}.{name}", f"{moe}.experts.{j}.{w}")
        add("final_norm", "model.norm")
    # Both state dicts list lm_head.weight even when it is tied (then it is tok_emb's tensor).
    add("lm_head", "lm_head")
    return pairs


# ModelConfig.gelu <-> GPT2Config.activation_function ("gelu_pytorch_tanh" is the same
# tanh approximation under another name).
_HF_GELU = {"tanh": "gelu_new", "exact": "gelu"}
_GELU_OF_HF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}


def to_hf_config(cfg: ModelConfig) -> Any:
    """The transformers config (GPT2Config / LlamaConfig) describing the same architecture.

    Special token ids are left unset: they belong to the tokenizer, not the architecture.
    """
    import transformers

    cfg.validate()
    special_tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if cfg.family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.context_length,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.d_ff,
            activation_function=_HF_GELU[cfg.gelu],
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std,
            tie_word_embeddings=cfg.tie_embeddings,
            # GPT2Config has no switch for biases; transformers keeps unknown keys in
            # config.json, so a bias-free model says so there (absent means biases).
            **({} if cfg.bias else {"lmlab_bias": False}),
            **special_tokens,
        )
    # LLaMA and Mixtral describe the shared parts (attention, RoPE, norms) the same way.
    llama_like = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_dropout=cfg.dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        **special_tokens,
    )
    if cfg.family == "moe":
        return transformers.MixtralConfig(
            **llama_like,
            sliding_window=None,
            num_local_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_per_token,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            router_jitter_noise=0.0,
            # Mixtral has no z-loss; kept in config.json (as lmlab_bias) when it is on.
            **(
                {"lmlab_router_z_loss_coef": cfg.router_z_loss_coef}
                if cfg.router_z_loss_coef
                else {}
            ),
        )
    return transformers.LlamaConfig(**llama_like, attention_bias=cfg.bias, mlp_bias=cfg.bias)


def from_hf_config(hf_config: Any) -> ModelConfig:
    """The ModelConfig of a transformers GPT-2, LLaMA or Mixtral config; UserError for
    variants we lack."""
    model_type = getattr(hf_config, "model_type", None)
    tied = bool(getattr(hf_config, "tie_word_embeddings", model_type == "gpt2"))
    if model_type == "gpt2":
        gelu = _GELU_OF_HF.get(hf_config.activation_function)
        if gelu is None:
            raise UserError(
                f"GPT-2 activation {hf_config.activation_function!r} is not supported; "
                "lmlab's GPT-2 uses the tanh GELU ('gelu_new') or the exact one ('gelu')"
            )
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or not getattr(
            hf_config, "scale_attn_weights", True
        ):
            raise UserError("GPT-2 with non-standard attention scaling is not supported")
        cfg = ModelConfig(
            family="gpt2",
            vocab_size=hf_config.vocab_size,
            context_length=hf_config.n_positions,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            d_model=hf_config.n_embd,
            d_ff=hf_config.n_inner or 4 * hf_config.n_embd,
            norm_eps=float(hf_config.layer_norm_epsilon),
            dropout=float(hf_config.resid_pdrop),
            bias=bool(getattr(hf_config, "lmlab_bias", True)),
            tie_embeddings=tied,
            gelu=gelu,
            init_std=float(hf_config.initializer_range),
        )
    elif model_type == "llama":
        if hf_config.hidden_act != "silu":
            raise UserError(f"LLaMA activation {hf_config.hidden_act!r} is not supported (silu)")
        head_dim = getattr(hf_config, "head_dim", None)
        if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
            raise UserError(
                f"LLaMA with head_dim={head_dim} != hidden_size / num_attention_heads "
                "is not supported"
            )
        rope_theta = _plain_rope_theta(hf_config, "LLaMA")
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        if attention_bias != bool(getattr(hf_config, "mlp_bias", False)):
            raise UserError("LLaMA with attention_bias != mlp_bias is not supported")
        cfg = ModelConfig(
            family="llama",
            vocab_size=hf_config.vocab_size,
            context_length=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            d_model=hf_config.hidden_size,
            d_ff=hf_config.intermediate_size,
            norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(rope_theta),
            dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
            bias=attention_bias,
            tie_embeddings=tied,
            init_std=float(hf_config.initializer_range),
        )
    elif model_type == "mixtral":
        cfg = _from_mixtral_config(hf_config, tied)
    else:
        raise UserError(
            f"cannot convert HF model type {model_type!r}; supported: gpt2, llama, mixtral"
        )
    cfg.validate()
    return cfg


def _plain_rope_theta(hf_config: Any, name: str) -> float:
    """The RoPE base of a config without RoPE scaling (UserError for scaled variants)."""
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta/rope_scaling.
    rope = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise UserError(f"{name} RoPE scaling {rope_type!r} is not supported")
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _from_mixtral_config(hf_config: Any, tied: bool) -> ModelConfig:
    if hf_config.hidden_act != "silu":
        raise UserError(f"Mixtral activation {hf_config.hidden_act!r} is not supported (silu)")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        raise UserError(
            f"Mixtral with head_dim={head_dim} != hidden_size / num_attention_heads "
            "is not supported"
        )
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and window < hf_config.max_position_embeddings:
        raise UserError(
            f"Mixtral with a sliding attention window of {window} positions is not supported"
        )
    if getattr(hf_config, "router_jitter_noise", 0.0):
        raise UserError("Mixtral with router_jitter_noise is not supported (lmlab's is 0)")
    return ModelConfig(
        family="moe",
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.max_position_embeddings,
        n_layer=hf_config.num_hidden_layers,
        n_head=hf_config.num_attention_heads,
        n_kv_head=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        d_model=hf_config.hidden_size,
        d_ff=hf_config.intermediate_size,
        norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=_plain_rope_theta(hf_config, "Mixtral"),
        dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        bias=False,
        tie_embeddings=tied,
        init_std=float(hf_config.initializer_range),
        n_expert=hf_config.num_local_experts,
        n_expert_per_token=hf_config.num_experts_per_tok,
        router_aux_loss_coef=float(hf_config.router_aux_loss_coef),
        router_z_loss_coef=float(getattr(hf_config, "lmlab_router_z_loss_coef", 0.0)),
    )


def _fused_names(i: int) -> tuple[str, str]:
    """transformers 5's in-memory names of layer i's stacked expert weights."""
    return f"model.layers.{i}.mlp.experts.gate_up_proj", f"model.layers.{i}.mlp.experts.down_proj"


def _fuse_experts(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert Mixtral names (the table's) -> transformers 5's fused in-memory layout."""
    out = dict(tensors)
    for i in range(cfg.n_layer):
        moe = f"model.layers.{i}.block_sparse_moe"
        gate_up, down = [], []
        for j in range(cfg.n_expert):
            w1, w3, w2 = (out.pop(f"{moe}.experts.{j}.{w}.weight") for w in ("w1", "w3", "w2"))
            gate_up.append(torch.cat((w1, w3)))  # (2 * d_ff, d_model)
            down.append(w2)  # (d_model, d_ff)
        gate_up_name, down_name = _fused_names(i)
        out[gate_up_name], out[down_name] = torch.stack(gate_up), torch.stack(down)
        out[f"model.layers.{i}.mlp.gate.weight"] = out.pop(f"{moe}.gate.weight")
    return out


def _split_experts(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused in-memory layout -> per-expert Mixtral names (the table's)."""
    out = dict(tensors)
    for i in range(cfg.n_layer):
        moe = f"model.layers.{i}.block_sparse_moe"
        gate_up_name, down_name = _fused_names(i)
        gate_up, down = out.pop(gate_up_name), out.pop(down_name)
        for j in range(cfg.n_expert):
            w1, w3 = gate_up[j].chunk(2)  # (d_ff, d_model) each
            for w, tensor in (("w1", w1), ("w3", w3), ("w2", down[j])):
                out[f"{moe}.experts.{j}.{w}.weight"] = tensor
        out[f"{moe}.gate.weight"] = out.pop(f"model.layers.{i}.mlp.gate.weight")
    return out


_HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "moe": "MixtralForCausalLM"}


@torch.no_grad()
def to_hf(model: nn.Module) -> Any:
    """A transformers GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM computing the
    same logits as model.

    The result is on the model's device and dtype, in eval mode.
    """
    import transformers

    cfg: ModelConfig = model.config
    hf_class = getattr(transformers, _HF_CLASSES[cfg.family])
    hf_model = hf_class(to_hf_config(cfg))
    ours = model.state_dict()
    theirs = {
        hf: ours[name].T if transposed else ours[name] for name, hf, transposed in param_pairs(cfg)
    }
    if cfg.family == "moe" and _fused_names(0)[0] in hf_model.state_dict():
        theirs = _fuse_experts(cfg, theirs)
    for name, tensor in hf_model.state_dict().items():
        if name not in theirs:
            if cfg.family == "gpt2" and not cfg.bias and name.endswith(".bias"):
                theirs[name] = torch.zeros_like(tensor)  # zero bias == no bias
            else:
                raise RuntimeError(f"to_hf: no lmlab tensor for HF parameter {name!r}")
    hf_model.load_state_dict(theirs, strict=True)
    param = next(model.parameters())
    return hf_model.to(device=param.device, dtype=param.dtype).eval()


@torch.no_grad()
def from_hf(hf_model: Any) -> nn.Module:
    """The lmlab model (GPT2 / Llama / MoE) equivalent to a transformers causal LM.

    The result is on the HF model's device and dtype, in eval mode.
    """
    cfg = from_hf_config(hf_model.config)
    theirs = hf_model.state_dict()
    if cfg.family == "moe" and _fused_names(0)[0] in theirs:
        theirs = _split_experts(cfg, theirs)
    pairs = param_pairs(cfg)
    missing = [hf for _, hf, _ in pairs if hf not in theirs]
    if missing:
        raise UserError(
            f"HF model lacks {missing[0]!r}: pass the causal LM "
            "(GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM), not the bare transformer"
        )
    used = {hf for _, hf, _ in pairs}
    for name, tensor in theirs.items():
        # A bias-free GPT-2 comes back from HF with zero biases, which we drop; anything
        # else the table does not read would be lost, so it is an error.
        if name not in used and not (name.endswith(".bias") and not cfg.bias and not tensor.any()):
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # old GPT-2 checkpoints keep the causal mask as a buffer
            raise UserError(f"HF model has {name!r}, which lmlab's {cfg.family} cannot hold")
    model = build_model(cfg)
    ours = {name: theirs[hf].T if transposed else theirs[hf] for name, hf, transposed in pairs}
    model.load_state_dict(ours, strict=True)
    param = next(hf_model.parameters())
    return model.to(device=param.device, dtype=param.dtype).eval()
