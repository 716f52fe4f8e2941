"""Loading a model back from a run folder or checkpoint: what eval, generate and export need;
`load_model` also takes Hugging Face folders, for predict, compare, eval tasks and chat."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmlab.config import Config
from lmlab.data.chat import DEFAULT_CHAT_TEMPLATE, read_chat_template
from lmlab.data.tokenizer import TextTokenizer, load_tokenizer
from lmlab.errors import UserError
from lmlab.model.build import build_model
from lmlab.model.lora import LoRAConfig, apply_lora
from lmlab.model.quant import quantize_base, quantize_for_inference
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
    spec: str | Path,
    device: str | torch.device = "cpu",
    quantized: bool = True,
    quantize: str | None = None,
):
    """(model in eval mode, TextTokenizer, Config, checkpoint path): what eval and generate need.

    A LoRA fine-tune's checkpoint holds its adapters alone: the base model named in its
    config is loaded (and must have the recorded SHA-256), then the adapters on top. A
    QLoRA run's base is quantized to NF4 as in training, unless `quantized` is False (to
    merge or export the adapters onto the full-precision base). `quantize="int8"` makes
    the linear layers int8 for inference (lmlab.model.quant.quantize_for_inference).
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
    quantize_for_inference(model, quantize)
    tokenizer = load_tokenizer(resolved.path / "tokenizer.json")
    return model, tokenizer, resolved.config, resolved.path


@dataclass
class LoadedModel:
    """A model ready to generate or score, wherever it came from."""

    model: torch.nn.Module
    """In eval mode, on the requested device."""
    tokenizer: TextTokenizer
    path: Path
    """The checkpoint folder (lmlab) or model folder (Hugging Face)."""
    kind: str
    """"lmlab" or "hf"."""
    chat_template: str | None = None
    """Jinja chat template the model was tuned with (None: lmlab's default layout)."""
    template_vars: dict[str, str] = field(default_factory=dict)
    """Special-token strings the template may use (bos_token, eos_token, ...)."""


def load_model(
    spec: str | Path, device: str | torch.device = "cpu", quantize: str | None = None
) -> LoadedModel:
    """An lmlab run, checkpoint or LoRA run, or a Hugging Face folder (an `lmlab export`
    among them) or Hub name, as one model for predict, eval tasks, compare and chat;
    `quantize` as in build_from_checkpoint."""
    path = Path(spec)
    if path.exists() and (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        source = open_source(path)
        model = build_model(source.model_config)
        source.load_into(model)
        model.to(device).eval()
        quantize_for_inference(model, quantize)
        template, variables = _chat_template(path)
        return LoadedModel(model, source.tokenizer, path, "hf", template, variables)
    if not path.exists() and str(spec).count("/") == 1 and not str(spec).startswith((".", "~")):
        # a Hub name: download, then as above
        return load_model(open_source(spec).path, device, quantize)
    model, tokenizer, _, ckpt = build_from_checkpoint(spec, device, quantize=quantize)
    template, variables = _chat_template(ckpt)
    return LoadedModel(model, tokenizer, ckpt, "lmlab", template, variables)


def _chat_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The folder's chat template, None when it is lmlab's own layout: fine-tunes and exports
    save that layout as chat_template.jinja, and it is applied piece by piece (turn text
    stays plain text, a reply ends at <|end|>), not as a template rendered whole."""
    template, variables = read_chat_template(folder)
    if template is not None and template.strip() == DEFAULT_CHAT_TEMPLATE.strip():
        template = None
    return template, variables
