"""Loading a model back from a run folder or checkpoint: what eval, generate and export need."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.data.tokenizer import load_tokenizer
from lmlab.model.build import build_model
from lmlab.runs.checkpoint import load_weights, resolve_checkpoint


def build_from_checkpoint(spec: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, TextTokenizer, Config, checkpoint path): what eval and generate need."""
    resolved = resolve_checkpoint(spec)
    model = build_model(resolved.config.model)
    load_weights(model, resolved.path)
    model.to(device).eval()
    tokenizer = load_tokenizer(resolved.path / "tokenizer.json")
    return model, tokenizer, resolved.config, resolved.path
