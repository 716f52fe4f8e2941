"""Fold a LoRA fine-tune into a plain model: W + scaling * B @ A, saved as an lmlab checkpoint.

The result is a full model like any other: `lmlab eval`, `generate`, `finetune --from`
and the exporters take it. Its config keeps the lineage (the base it came from, the
adapter's settings) with `finetune.method` set to full.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab import __version__
from lmlab.config import Config, save_config
from lmlab.errors import UserError
from lmlab.fileio import atomic_directory, atomic_write_json
from lmlab.model.lora import lora_modules, merge_lora
from lmlab.runs.checkpoint import ADAPTER_FILE, CHECKPOINT_VERSION, WEIGHTS_FILE, resolve_checkpoint
from lmlab.runs.load import build_from_checkpoint
from lmlab.train.distributed.state import tied_duplicates

COPIED_FILES = ("tokenizer.json", "chat_template.jinja")


def merge_run(spec: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Merge the adapters of a LoRA run (its newest checkpoint) or checkpoint into a full
    model written to `out` as a checkpoint folder; returns `out`."""
    from safetensors.torch import save_file

    resolved = resolve_checkpoint(spec)
    if not (resolved.path / ADAPTER_FILE).is_file():
        raise UserError(f"{resolved.path} holds no LoRA adapters: it is a full model already")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: choose another --out, or pass --overwrite")
    model, _, cfg, ckpt = build_from_checkpoint(resolved.path, quantized=False)
    if not lora_modules(model):
        raise UserError(f"{ckpt} did not load any LoRA adapters")
    merged = merge_lora(model).eval()
    weights = {
        name: tensor.detach().contiguous()
        for name, tensor in merged.state_dict().items()
        if name not in tied_duplicates(merged)  # a tied head is saved once
    }
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_config(_merged_config(cfg), tmp / "config.yaml")
        for name in COPIED_FILES:
            if (ckpt / name).is_file():
                (tmp / name).write_bytes((ckpt / name).read_bytes())
        atomic_write_json(
            tmp / "meta.json",
            {
                "version": CHECKPOINT_VERSION,
                "lmlab": __version__,
                "step": meta.get("step"),
                "tokens_seen": meta.get("tokens_seen"),
                "val_loss": meta.get("val_loss"),
                "merged_from": str(ckpt),
            },
        )
    return out


def _merged_config(cfg: Config) -> Config:
    merged = Config.from_dict(cfg.to_dict())
    merged.finetune.method = "full"  # a plain model now: fine-tune it again, export it
    return merged
