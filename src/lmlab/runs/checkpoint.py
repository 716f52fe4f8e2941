"""Checkpoints: a folder per save, written atomically, loadable without unpickling code.

    RUN_DIR/checkpoints/step_00001000/
        model.safetensors      weights (safetensors: plain tensors, nothing executable); a
                               LoRA fine-tune saves adapter.safetensors (the adapters alone)
                               instead, and its config names the base model
        state.pt               optimizer, train state, data cursor, RNG states; read with
                               torch.load(weights_only=True), which refuses arbitrary objects
        config.yaml            the run's resolved config
        tokenizer.json         so the checkpoint generates text on its own, on any machine
        meta.json              step, tokens seen, val loss, lmlab version

A checkpoint folder is built under a temporary name and renamed into place only when
complete; older checkpoints are deleted only after a new one exists. A crash, a kill or a
full disk therefore never touches the last good checkpoint.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file
from torch import nn

from lmlab import __version__
from lmlab.config import Config, load_config, save_config
from lmlab.errors import UserError
from lmlab.fileio import atomic_directory, atomic_write_json, remove_directory

CHECKPOINT_VERSION = 1
PREFIX = "step_"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "meta.json").read_text(encoding="utf-8"))


def save_checkpoint(
    run_dir: str | Path,
    weights: dict[str, torch.Tensor],
    cfg: Config,
    tokenizer_json: str,
    state: dict[str, Any],
    meta: dict[str, Any],
    weights_file: str = WEIGHTS_FILE,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write one checkpoint atomically and return its folder.

    `weights` is the model's full state dict with each tied parameter once (see
    `lmlab.train.distributed.state.full_weights`); `load_weights` restores the ties.
    """
    target = checkpoint_dir(run_dir, meta["step"])
    with atomic_directory(target, overwrite=True) as tmp:
        save_file(weights, str(tmp / weights_file), metadata={"format": "pt"})
        torch.save(state, tmp / "state.pt")
        save_config(cfg, tmp / "config.yaml")
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        atomic_write_json(
            tmp / "meta.json", {"version": CHECKPOINT_VERSION, "lmlab": __version__, **meta}
        )
    return target


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_best: bool) -> None:
    """Delete all but the newest `keep_last` checkpoints and, optionally, the best by val loss."""
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    if keep_best:
        scored = [(read_meta(c).get("val_loss"), c) for c in ckpts]
        scored = [(loss, c) for loss, c in scored if loss is not None]
        if scored:
            keep.add(min(scored, key=lambda t: t[0])[1])
    for ckpt in ckpts:
        if ckpt not in keep:  # hidden first: a half-deleted checkpoint never looks complete
            remove_directory(ckpt)


def load_state(ckpt: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Optimizer/train/RNG state, loaded with weights_only=True: a pickle that tries to run
    code is refused with a UserError, never executed."""
    path = Path(ckpt) / "state.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path} holds objects that are not plain tensors or containers; refusing to load it ({str(e).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise UserError(
            f"{path} is corrupt or not a checkpoint state: {str(e).splitlines()[0][:160]}"
        ) from None


def load_weights(model: nn.Module, ckpt: str | Path) -> None:
    """Load safetensors weights into `model` (strict: every tensor must match)."""
    path = Path(ckpt) / WEIGHTS_FILE
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as e:  # safetensors raises plain errors for bad headers
        raise UserError(f"{path} could not be loaded: {str(e).splitlines()[0][:200]}") from None
    if missing or unexpected:
        raise UserError(
            f"{path} does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )


@dataclass
class ResolvedCheckpoint:
    path: Path
    run_dir: Path | None
    config: Config


def resolve_checkpoint(spec: str | Path) -> ResolvedCheckpoint:
    """A run folder (its newest checkpoint) or a checkpoint folder."""
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run folder or a checkpoint folder")
    if (path / "meta.json").is_file() and (
        (path / WEIGHTS_FILE).is_file() or (path / ADAPTER_FILE).is_file()
    ):
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return ResolvedCheckpoint(path, run_dir, load_config(path / "config.yaml"))
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise UserError(
            f"{path} has no checkpoints (expected a run folder with checkpoints/ or a checkpoint folder)"
        )
    return ResolvedCheckpoint(ckpts[-1], path, load_config(ckpts[-1] / "config.yaml"))


def load_adapter(model: nn.Module, ckpt: str | Path) -> None:
    """Load a LoRA checkpoint's adapter.safetensors into a model that has its adapters."""
    from safetensors.torch import load_file

    from lmlab.model.lora import load_lora_state_dict

    path = Path(ckpt) / ADAPTER_FILE
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises plain errors for bad headers
        raise UserError(f"{path} could not be loaded: {str(e).splitlines()[0][:200]}") from None
    load_lora_state_dict(model, tensors)
