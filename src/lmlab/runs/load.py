"""Loading a model back from a run folder or checkpoint: what eval, generate and export need."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import Config
from lmlab.data.tokenizer import load_tokenizer
from lmlab.errors import UserError
from lmlab.model.build import build_model
from lmlab.model.lora import LoRAConfig, apply_lora
from lmlab.model.quant import quantize_base
from lmlab.runs.checkpoint import ADAPTER_FILE, load_adapter, load_weights, resolve_checkpoint
from lmlab.runs.source import ModelSource, open_source


def lora_config(cfg: Config) -> LoRAConfig:
    """A run's LoRA settings (finetune.lora_*) as a LoRAConfig; no targets: every projection."""
    f = cfg.finetune
    targets = [t.strip() for t in f.lora_targets.split(",") if t.strip()] or ["all-linear"]
    return LoRAConfig(
        rank=f.lora_rank,
        alpha=f.lora_alpha,
        dropout=f.lora_dropout,
        targets=targets,
        rslora=f.lora_rslora,
    )


def open_base(cfg: Config) -> ModelSource:
    """The base model a fine-tune names, refused in one line unless its weights are the ones
    the run was trained on."""
    base = open_source(cfg.finetune.base)
    if cfg.finetune.base_sha256 and base.weights_sha256 != cfg.finetune.base_sha256:
        raise UserError(
            f"{cfg.finetune.base} is not this run's base model: its weights' SHA-256 is "
            f"{base.weights_sha256[:12]}..., the run was fine-tuned from {cfg.finetune.base_sha256[:12]}..."
        )
    return base


def build_from_checkpoint(
    spec: str | Path, device: str | torch.device = "cpu", quantized: bool = True
):
    """(model in eval mode, TextTokenizer, Config, checkpoint path): what eval and generate need.

    A LoRA fine-tune's checkpoint holds its adapters alone: the base model named in its
    config is loaded (and must have the recorded SHA-256), then the adapters on top. A
    QLoRA run's base is quantized to NF4 as in training, unless `quantized` is False (to
    merge or export the adapters onto the full-precision base).
    """
    resolved = resolve_checkpoint(spec)
    cfg = resolved.config
    model = build_model(cfg.model)
    if (resolved.path / ADAPTER_FILE).is_file():
        base = open_base(cfg)
        base.load_into(model)
        apply_lora(model, lora_config(cfg))
        load_adapter(model, resolved.path)
        if quantized and cfg.finetune.method == "qlora":
            quantize_base(model)
    else:
        load_weights(model, resolved.path)
    model.to(device).eval()
    tokenizer = load_tokenizer(resolved.path / "tokenizer.json")
    return model, tokenizer, resolved.config, resolved.path
