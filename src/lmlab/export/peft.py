"""LoRA adapters in PEFT's format, both ways.

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight  (r, in)
                                 base_model.model.<HF module>.lora_B.weight  (out, r)

so that `peft.PeftModel.from_pretrained(<the base as a transformers model>, DIR)` computes
what the lmlab LoRA model computes. Module names come from the one table that converts
whole models (`lmlab.model.hf.param_pairs`): `blocks.3.attn.q_proj` is
`model.layers.3.self_attn.q_proj`, `blocks.3.attn.c_attn` is `transformer.h.3.attn.c_attn`.
GPT-2's Hugging Face layers are Conv1D, whose weight is stored (in, out); PEFT keeps A and
B in nn.Linear's shapes for them too and only needs `fan_in_fan_out: true` to merge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.fileio import atomic_directory
from lmlab.model.config import ModelConfig
from lmlab.model.hf import param_pairs
from lmlab.model.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def module_names(cfg: ModelConfig) -> dict[str, str]:
    """lmlab module name -> Hugging Face module name, for every linear layer with a weight."""
    return {
        ours.removesuffix(".weight"): theirs.removesuffix(".weight")
        for ours, theirs, _ in param_pairs(cfg)
        if ours.endswith(".weight")
    }


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapters under PEFT's key names."""
    names = module_names(model.config)
    out = {}
    for name, module in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            tensor = getattr(module, part).weight.detach().to("cpu", torch.float32)
            out[f"{PREFIX}{names[name]}.{part}.weight"] = tensor.contiguous()
    return out


def peft_config(lora: LoRAConfig, cfg: ModelConfig, base: str | None) -> dict[str, Any]:
    """adapter_config.json for a LoRA of `lora` on a model of `cfg`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.resolve_targets(cfg.family)),
        "fan_in_fan_out": cfg.family == "gpt2",  # HF GPT-2's Conv1D stores weights (in, out)
        "bias": "none",
        "use_rslora": lora.rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _check_describes(lora: LoRAConfig, model: nn.Module) -> None:
    """UserError unless `lora` is the config the model's adapters were made with: PEFT
    rebuilds the adapters from adapter_config.json alone, and a wrong r, alpha or target
    list there would load with other shapes, another scaling, or tensors silently skipped."""
    modules = lora_modules(model)
    adapted = {name.rpartition(".")[2] for name in modules}
    targets = set(lora.resolve_targets(model.config.family))
    ranks = {m.rank for m in modules.values()}
    scalings = {m.scaling for m in modules.values()}
    if adapted != targets or ranks != {lora.rank}:
        raise UserError(
            f"the LoRA config (rank {lora.rank}, targets {', '.join(sorted(targets))}) does not "
            f"describe the model's adapters (rank {', '.join(map(str, sorted(ranks)))}, "
            f"on {', '.join(sorted(adapted))})"
        )
    if not all(math.isclose(s, lora.scaling, rel_tol=1e-6) for s in scalings):
        raise UserError(
            f"the LoRA config's scaling {lora.scaling:g} (alpha {lora.alpha:g}, rslora "
            f"{lora.rslora}) is not the model's adapters' {', '.join(f'{s:g}' for s in scalings)}"
        )


def save_peft_adapter(
    model: nn.Module,
    lora: LoRAConfig,
    out: str | Path,
    base: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model's adapters as a PEFT adapter folder, atomically.

    `base` becomes base_model_name_or_path; one that carries credentials (a URL with a user
    or password) is refused, so a token never lands in a file meant to be shared.
    """
    from safetensors.torch import save_file

    if not lora_modules(model):
        raise UserError("the model has no LoRA adapters to export")
    _check_describes(lora, model)
    if base is not None and "://" in base:
        url = urlsplit(base)
        if url.username or url.password:
            raise UserError("the base model's address carries credentials: pass it without them")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: choose another --out, or pass --overwrite")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(peft_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = peft_config(lora, model.config, base)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def export_run(spec: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A LoRA run's (newest) or checkpoint's adapters as a PEFT adapter folder."""
    from lmlab.runs.checkpoint import ADAPTER_FILE, resolve_checkpoint
    from lmlab.runs.load import build_from_checkpoint, lora_config

    resolved = resolve_checkpoint(spec)
    if not (resolved.path / ADAPTER_FILE).is_file():
        raise UserError(f"{resolved.path} is not a LoRA fine-tune: it has no adapters to export")
    model, _, cfg, _ = build_from_checkpoint(resolved.path, quantized=False)
    return save_peft_adapter(model, lora_config(cfg), out, cfg.finetune.base or None, overwrite)


def read_peft_config(folder: str | Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter folder; one-line errors for what lmlab cannot load."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a PEFT adapter config (a JSON object)")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{folder} is a {config.get('peft_type')!r} adapter; lmlab loads LoRA only")
    unsupported = [
        key
        for key, ok in (
            ("use_dora", not config.get("use_dora")),
            ("bias", config.get("bias", "none") == "none"),
            ("modules_to_save", not config.get("modules_to_save")),
            ("rank_pattern", not config.get("rank_pattern")),
            ("alpha_pattern", not config.get("alpha_pattern")),
            ("layers_to_transform", config.get("layers_to_transform") is None),
            ("lora_bias", not config.get("lora_bias")),
            ("layer_replication", not config.get("layer_replication")),
            ("trainable_token_indices", not config.get("trainable_token_indices")),
            ("target_parameters", not config.get("target_parameters")),
            ("alora_invocation_tokens", not config.get("alora_invocation_tokens")),
        )
        if not ok
    ]
    if unsupported:
        raise UserError(f"{folder}: PEFT settings lmlab does not load: {', '.join(unsupported)}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets] if targets == "all-linear" else None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UserError(f"{folder}: target_modules must be a list of module names")
    try:
        rank, alpha = config["r"], float(config["lora_alpha"])
        dropout = float(config.get("lora_dropout") or 0.0)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{folder}: r and lora_alpha must be numbers in {CONFIG_FILE}") from None
    return LoRAConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        # PEFT matches a dotted name ("self_attn.q_proj") as a suffix of module names; the
        # tensors themselves then say exactly which modules are adapted.
        targets=[t.rpartition(".")[2] for t in targets],
        rslora=bool(config.get("use_rslora", False)),
    )


def load_peft_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Put a PEFT adapter on an lmlab model (which must have no adapters yet); returns its
    LoRAConfig. Only safetensors weights are read."""
    from safetensors.torch import load_file

    folder = Path(folder)
    lora = read_peft_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise UserError(
            f"{folder} has no {WEIGHTS_FILE}"
            + (" (only a pickled adapter_model.bin, which lmlab never loads)" if pickled else "")
        )
    if lora_modules(model):
        raise UserError(
            "the model already has LoRA adapters: load a PEFT adapter onto a plain model"
        )
    try:
        loaded = load_file(str(weights))
    except Exception as e:  # safetensors raises plain errors for bad headers
        raise UserError(f"{weights} could not be read: {str(e).splitlines()[0][:200]}") from None
    # Every check comes before apply_lora: a refused adapter leaves the model as it was.
    targets = lora.resolve_targets(model.config.family)
    adaptable = {  # HF module name -> lmlab module name, for the layers target_modules names
        theirs: ours
        for ours, theirs in module_names(model.config).items()
        if ours.rpartition(".")[2] in targets and ours != "lm_head"
    }
    tensors = {}
    for key, tensor in loaded.items():
        module, _, part = key.removeprefix(PREFIX).removesuffix(".weight").rpartition(".")
        if (
            module not in adaptable
            or part not in ("lora_A", "lora_B")
            or not key.endswith(".weight")
        ):
            raise UserError(
                f"{folder}: adapter tensor {key} is on no layer of this model that "
                "target_modules names (made for another architecture?)"
            )
        linear = model.get_submodule(adaptable[module])
        needed = (
            (lora.rank, linear.in_features)
            if part == "lora_A"
            else (linear.out_features, lora.rank)
        )
        if tuple(tensor.shape) != needed:
            raise UserError(
                f"{folder} was made for another base model (or rank): {key} has shape "
                f"{tuple(tensor.shape)}, this model needs {needed}"
            )
        tensors[f"{adaptable[module]}.{part}.weight"] = tensor
    missing = sorted(
        f"{PREFIX}{theirs}.{part}.weight"
        for theirs, ours in adaptable.items()
        for part in ("lora_A", "lora_B")
        if f"{ours}.{part}.weight" not in tensors
    )
    if missing:
        raise UserError(
            f"{folder} lacks {len(missing)} adapter tensor(s) its target_modules call for, "
            f"e.g. {missing[0]}: made for a model with other layers?"
        )
    apply_lora(model, lora)
    load_lora_state_dict(model, tensors)
    return lora
