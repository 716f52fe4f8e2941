"""A model to start from (`lmlab finetune --from SOURCE`), wherever it lives:

    an lmlab run folder or checkpoint     runs/tiny/20261123-101500, .../checkpoints/step_N
    a Hugging Face folder                 config.json + *.safetensors + tokenizer.json of a
                                          GPT2LMHeadModel or LlamaForCausalLM
    a Hugging Face Hub name               org/name, downloaded (safetensors only) when online

Every source reports the SHA-256 of its weights, so a run can record which base it was
fine-tuned from and refuse to resume or merge against any other. Weights are read from
safetensors only: no pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from lmlab.data.corpus import hub_offline
from lmlab.data.tokenizer import TextTokenizer, load_tokenizer
from lmlab.errors import UserError
from lmlab.fileio import sha256_file
from lmlab.model.config import ModelConfig
from lmlab.runs.checkpoint import load_weights, resolve_checkpoint

HF_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


@dataclass
class ModelSource:
    """Where a base model comes from: its architecture, tokenizer and weights."""

    kind: Literal["lmlab", "hf"]
    path: Path
    """The checkpoint folder (lmlab) or model folder (hf)."""
    model_config: ModelConfig
    tokenizer: TextTokenizer
    weights_sha256: str
    weight_files: list[Path] = field(default_factory=list)

    def load_into(self, model: nn.Module) -> None:
        """Copy the source's weights into `model` (built from `model_config`)."""
        if self.kind == "lmlab":
            load_weights(model, self.path)
            return
        from lmlab.model.hf import from_hf

        hf_model = _load_hf_model(self.path)
        model.load_state_dict(from_hf(hf_model).state_dict(), strict=True)


def open_source(spec: str | Path) -> ModelSource:
    """Resolve `spec` to a ModelSource, or say in one line why it is not a model."""
    path = Path(spec)
    if path.exists():
        if (path / "config.json").is_file():
            return _hf_source(path)
        if (path / "config.yaml").is_file():
            return _lmlab_source(path)
        raise UserError(
            f"{path} is not a model: expected an lmlab run or checkpoint folder, or a Hugging "
            "Face folder with config.json"
        )
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _hf_source(_download(text))
    raise UserError(f"{spec} does not exist (and is not a Hugging Face Hub name like org/model)")


def weights_sha256(files: list[Path]) -> str:
    """One SHA-256 for a set of weight files (one file: that file's own hash)."""
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _lmlab_source(path: Path) -> ModelSource:
    resolved = resolve_checkpoint(path)
    cfg = resolved.config
    if cfg.finetune.method != "full":
        raise UserError(
            f"{path} is a {cfg.finetune.method.upper()} fine-tune (adapters only): make a full "
            "model first with `lmlab lora merge`, then fine-tune that"
        )
    weights = resolved.path / "model.safetensors"
    return ModelSource(
        kind="lmlab",
        path=resolved.path,
        model_config=cfg.model,
        tokenizer=load_tokenizer(resolved.path / "tokenizer.json"),
        weights_sha256=weights_sha256([weights]),
        weight_files=[weights],
    )


def _hf_source(path: Path) -> ModelSource:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise UserError(
            f"{path} has no .safetensors weights"
            + (f" (only pickled {pickled[0]}, which lmlab never loads)" if pickled else "")
            + "; save the model with save_pretrained(..., safe_serialization=True)"
        )
    try:
        import transformers
    except ImportError:
        raise UserError(
            "loading a Hugging Face model needs transformers: pip install 'lmlab[hf]'"
        ) from None
    from lmlab.model.hf import from_hf_config

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/config.json could not be read: {str(e).splitlines()[0]}") from None
    return ModelSource(
        kind="hf",
        path=path,
        model_config=from_hf_config(hf_config),
        tokenizer=load_tokenizer(path),
        weights_sha256=weights_sha256(files),
        weight_files=files,
    )


def _load_hf_model(path: Path):
    import torch
    import transformers

    from lmlab.model.hf import quiet_transformers

    with quiet_transformers():
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, use_safetensors=True
        )


def _download(name: str) -> Path:
    """A Hub model's files (safetensors, configs, tokenizer) in the local cache.

    Offline (HF_HUB_OFFLINE=1, or no route to the Hub) only the cache is used, and a model
    that is not there fails at once in one line instead of after retries.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            "loading from the Hugging Face Hub needs huggingface_hub: pip install 'lmlab[hf]'"
        ) from None
    offline = hub_offline()
    try:
        folder = snapshot_download(name, allow_patterns=HF_FILES, local_files_only=offline)
    except Exception as e:  # huggingface_hub raises many kinds; all mean "not available"
        where = "offline and not in the local cache" if offline else "could not be downloaded"
        raise UserError(
            f"Hugging Face model {name!r} {where}: {str(e).splitlines()[0][:160]}"
        ) from None
    return Path(folder)
