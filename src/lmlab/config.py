"""The typed config tree: model / data / train / eval / checkpoint / logging.

A run's configuration is built in layers, each overriding the last:

    defaults  ->  --preset NAME  ->  --config FILE.yaml  ->  dotted overrides (train.lr=3e-4)

and the resolved tree is saved in every run directory as `config.yaml`, which
`load_config` reads back unchanged. Every section is a dataclass whose fields document
themselves; unknown keys and bad values are one-line errors with a did-you-mean.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text
from lmlab.model.config import ModelConfig
from lmlab.model.presets import MODEL_PRESETS, get_model_preset
from lmlab.recipes import RECIPES
from lmlab.typed_dict import from_dict, suggest

CONFIG_VERSION = 1
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""A run name is one folder name: no path separators, no '..', not too long."""

# Choices, each written once: the config validates them, and the planner, `lmlab bench`
# and the command lines offer the tuples derived from them.
Strategy = Literal["ddp", "zero1", "fsdp"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
ActivationCheckpointing = Literal["none", "selective", "full"]
ACTIVATION_CHECKPOINTING: tuple[str, ...] = get_args(ActivationCheckpointing)
TrainingDType = Literal["fp32", "bf16", "fp16"]
TRAINING_DTYPES: tuple[str, ...] = get_args(TrainingDType)
Precision = Literal["auto", TrainingDType]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Schedule = Literal["cosine", "linear", "constant", "wsd"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
OptimizerName = Literal["adamw", "muon"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
FinetuneMethod = Literal["full", "lora", "qlora"]
FINETUNE_METHODS: tuple[str, ...] = get_args(FinetuneMethod)
Objective = Literal["sft", "dpo"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
OnOverflow = Literal["truncate", "error"]
ON_OVERFLOW: tuple[str, ...] = get_args(OnOverflow)
OnNonfinite = Literal["skip", "rollback", "stop"]
ON_NONFINITE: tuple[str, ...] = get_args(OnNonfinite)
Packing = Literal["concat", "best_fit"]
PACKINGS: tuple[str, ...] = get_args(Packing)


@dataclass
class DataConfig:
    path: str = ""
    """Prepared data directory, written by `lmlab prepare`."""
    vocab_from_data: bool = True
    """Set model.vocab_size to the data's tokenizer vocabulary (else they must be compatible)."""
    packing: Packing = "concat"
    """How training rows are cut from the token stream. concat: windows of seq_len + 1 tokens
    (documents start mid-row); best_fit: whole documents placed into rows by best-fit
    decreasing (long ones split), the rest padding whose targets are ignored. Evaluation
    always reads concat windows."""
    doc_mask: bool = False
    """Tokens attend only to their own document within a row, and positions restart at 0 at
    each document (a block-diagonal causal mask)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    epochs: float = 0.0
    """Passes over the train split (> 0: sets max_steps from the data's token count)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass (per process)."""
    seq_len: int = 0
    """Tokens per training sequence (0 -> model.context_length)."""
    tokens_per_step: int = 0
    """Target tokens per optimizer step, reached by gradient accumulation (0 -> one micro-batch)."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    warmup_fraction: float = 0.0
    """> 0: warmup_steps is this fraction of max_steps instead (e.g. 0.05)."""
    schedule: Schedule = "cosine"
    """Decay after warmup. wsd (warmup-stable-decay): constant at lr, then a linear decay to
    the floor over the last decay_fraction of max_steps; a run can be extended (a larger
    max_steps) before its decay began without a jump in the learning rate."""
    decay_fraction: float = 0.2
    """schedule=wsd: the share of max_steps spent decaying at the end."""
    optimizer: OptimizerName = "adamw"
    """adamw; or muon: Muon (momentum orthogonalised by Newton-Schulz, torch.optim.Muon) for
    the 2-D weights inside the blocks, AdamW for embeddings, the output head, norms and
    biases. Muon's step is scaled to AdamW's update size (match_rms_adamw), so train.lr and
    train.weight_decay mean the same for both. One process or ddp."""
    muon_momentum: float = 0.95
    """optimizer=muon: Muon's (Nesterov) momentum."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: Precision = "auto"
    """auto: bf16 autocast on GPUs that support it, fp16 + grad scaler on older GPUs, fp32 on CPU."""
    compile: bool = False
    """torch.compile the model."""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."""
    seed: int = 1337
    """Seed of initialisation, data order and dropout."""
    cpu_threads: int = 0
    """Intra-op threads on CPU (0 -> torch's default)."""
    strategy: Strategy = "ddp"
    """With several processes (torchrun / --nproc): ddp replicates everything; zero1 also shards
    AdamW's state; fsdp (FSDP2) shards weights, gradients and optimizer state. One process: plain."""
    activation_checkpointing: ActivationCheckpointing = "none"
    """Recompute activations in the backward pass to save memory: selective recomputes each
    block's MLP, full recomputes whole blocks (keeping only their inputs)."""
    on_nonfinite: OnNonfinite = "skip"
    """A step whose loss or gradients are not finite changes nothing (weights and AdamW state
    stay). skip: stop with an error after max_bad_steps such steps in a row; rollback: then
    go back to the last good checkpoint with the learning rate times rollback_lr_factor;
    stop: stop at the first one."""
    max_bad_steps: int = 10
    """Non-finite steps in a row that skip / rollback tolerate."""
    rollback_lr_factor: float = 0.5
    """on_nonfinite=rollback: the learning rate is multiplied by this at each rollback."""
    max_rollbacks: int = 3
    """on_nonfinite=rollback: stop with an error after this many rollbacks in one invocation."""
    spike_zscore: float = 0.0
    """> 0: a logged loss this many standard deviations above the mean of the previous
    spike_window logged losses is a spike: rollback and stop act on it, skip warns."""
    spike_window: int = 20
    """Logged losses that a spike is measured against."""
    verify_data: bool = False
    """Check every shard's SHA-256 against the manifest before training (reads all the
    data once). Always checked: each shard's header, size and token count, and every token
    id read against the vocabulary."""


@dataclass
class EvalConfig:
    interval: int = 200
    """Evaluate every this many steps (0 -> only at the end)."""
    batches: int = 20
    """Validation batches per evaluation (0 -> the whole val split)."""


@dataclass
class CheckpointConfig:
    interval: int = 500
    """Save every this many steps (0 -> only at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest val loss."""


@dataclass
class LoggingConfig:
    interval: int = 10
    """Log (and read the loss back from the device) every this many steps."""
    runs_dir: str = "runs"
    """Runs are written to RUNS_DIR/NAME/RUN_ID/."""
    name: str = ""
    """Run name (empty -> the preset's name, or 'run')."""
    tensorboard: bool = True
    """Write TensorBoard events when the tensorboard package is installed."""


@dataclass
class FinetuneConfig:
    """Set by `lmlab finetune`; a run with an empty `base` is trained from scratch."""

    base: str = ""
    """The model fine-tuned: an lmlab run or checkpoint folder, or a Hugging Face folder or name."""
    base_sha256: str = ""
    """SHA-256 of the base weights: a resume or a merge against other weights is refused."""
    method: FinetuneMethod = "full"
    """full: every weight trains; lora: low-rank adapters on a frozen base; qlora: adapters
    on a base held in 4-bit NF4."""
    objective: Objective = "sft"
    """sft: next-token loss on completions; dpo: preference pairs against the starting model."""
    data: str = ""
    """JSONL of prompt/completion, messages or text records (pairs for dpo), or dsl:NAME[:N]."""
    val_data: str = ""
    """Validation JSONL (empty -> a seeded val_fraction of `data`, or the language's val split)."""
    val_fraction: float = 0.05
    """Share of `data` held out for validation when there is no val_data."""
    skip_bad: bool = False
    """Skip (and count) malformed records instead of stopping at the first."""
    on_overflow: OnOverflow = "truncate"
    """Examples longer than the sequence: truncate them (and count), or stop with an error."""
    lora_rank: int = 8
    """Rank of the LoRA matrices."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the update is B @ A * alpha / rank."""
    lora_dropout: float = 0.0
    """Dropout on the input of the LoRA path."""
    lora_targets: str = ""
    """Comma-separated module names to adapt (empty -> every attention and MLP projection)."""
    lora_rslora: bool = False
    """Scale the update by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank."""
    adapter: str = ""
    """A PEFT LoRA adapter folder to start from (its rank, alpha and targets replace lora_*)."""
    dpo_beta: float = 0.1
    """DPO temperature: how far the policy may move from the reference."""
    epochs: float = 0.0
    """Passes over the training examples; sets train.max_steps when > 0."""


SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "finetune": FinetuneConfig,
}


@dataclass
class Config:
    """Everything a training run needs."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.context_length

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a complete tree (as `to_dict` wrote); unknown keys are refused."""
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise UserError(
                f"config version {version} is not supported (this lmlab reads {CONFIG_VERSION})"
            )
        for key in d:
            if key != "model" and key not in SECTIONS:
                raise UserError(
                    f"unknown config section {key!r}{suggest(key, ['model', *SECTIONS])}"
                )
        if "model" not in d:
            raise UserError("config has no model section")
        sections = {
            name: from_dict(section_cls, d.get(name) or {}, name)
            for name, section_cls in SECTIONS.items()
        }
        return cls(model=ModelConfig.from_dict(d["model"]), **sections)

    def validate(self) -> None:
        """One-line UserErrors for values that cannot work."""
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(f"{section.name}.{f.name} must be a finite number, got {value}")
        self.model.validate()
        t = self.train
        if t.seed < 0:
            raise UserError(f"train.seed must be >= 0, got {t.seed}")
        if not t.adam_eps > 0:
            raise UserError(f"train.adam_eps must be positive, got {t.adam_eps}")
        name = self.logging.name
        if name and (not RUN_NAME.match(name) or ".." in name):
            raise UserError(
                f"logging.name {name[:60]!r} is not a run name: letters, digits, '.', '_' and "
                "'-', starting with a letter or digit, at most 100 characters (it names a folder)"
            )
        positive = {
            "train.max_steps": t.max_steps,
            "train.micro_batch_size": t.micro_batch_size,
            "train.lr": t.lr,
            "eval.batches + 1": self.eval.batches + 1,
            "logging.interval": self.logging.interval,
            "checkpoint.keep_last": self.checkpoint.keep_last,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"{name.replace(' + 1', '')} must be positive, got {value}")
        non_negative = {
            "train.seq_len": t.seq_len,
            "train.tokens_per_step": t.tokens_per_step,
            "train.warmup_steps": t.warmup_steps,
            "train.weight_decay": t.weight_decay,
            "train.grad_clip": t.grad_clip,
            "train.cpu_threads": t.cpu_threads,
            "eval.interval": self.eval.interval,
            "checkpoint.interval": self.checkpoint.interval,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise UserError(f"{name} must not be negative, got {value}")
        if not (t.epochs >= 0 and math.isfinite(t.epochs)):
            raise UserError(f"train.epochs must be >= 0, got {t.epochs}")
        if not 0.0 <= t.warmup_fraction < 1.0:
            raise UserError(f"train.warmup_fraction must be in [0, 1), got {t.warmup_fraction}")
        if not 0.0 < t.rollback_lr_factor <= 1.0:
            raise UserError(
                f"train.rollback_lr_factor must be in (0, 1], got {t.rollback_lr_factor}"
            )
        for name in ("max_bad_steps", "max_rollbacks", "spike_window"):
            if getattr(t, name) < 1:
                raise UserError(f"train.{name} must be at least 1, got {getattr(t, name)}")
        if t.spike_zscore < 0:
            raise UserError(f"train.spike_zscore must be >= 0 (0: off), got {t.spike_zscore}")
        if not 0.0 < t.decay_fraction <= 1.0:
            raise UserError(f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
        if not 0.0 <= t.muon_momentum < 1.0:
            raise UserError(f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}")
        if t.optimizer == "muon" and t.strategy != "ddp":
            raise UserError(
                f"train.optimizer=muon works with train.strategy=ddp (or one process), not "
                f"{t.strategy}: Muon orthogonalises whole matrices, which {t.strategy} shards"
            )
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                raise UserError(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
        if self.seq_len > self.model.context_length:
            raise UserError(
                f"train.seq_len={self.seq_len} is longer than model.context_length={self.model.context_length}"
            )
        if not (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:")):
            raise UserError(
                f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}"
            )


def preset_names() -> list[str]:
    return [*RECIPES, *MODEL_PRESETS]


def _model_from_overrides(base: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """Apply model overrides, re-deriving family defaults that the overrides invalidate.

    A preset stores resolved values (d_ff, n_kv_head, bias...). When an override changes
    what they derive from and does not set them itself, they are derived again: widening a
    model to d_model=512 also widens its MLP.
    """
    d = base.to_dict()
    overrides = dict(overrides)
    if "preset" in overrides:
        d = get_model_preset(overrides.pop("preset")).to_dict()
    d.update(overrides)
    derived = {
        "d_ff": ("family", "d_model", "ffn_multiple_of"),
        "n_kv_head": ("n_head",),
        "bias": ("family",),
        "tie_embeddings": ("family",),
    }
    for key, sources in derived.items():
        if key not in overrides and any(s in overrides for s in sources):
            d[key] = None
    return ModelConfig.from_dict(d)


def merge(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new Config with a nested dict of overrides applied (sections merge key by key)."""
    d = copy.deepcopy(dataclasses.asdict(cfg))
    model = cfg.model
    for section, values in overrides.items():
        if section == "version":
            continue
        if section != "model" and section not in SECTIONS:
            raise UserError(
                f"unknown config section {section!r}{suggest(section, ['model', *SECTIONS])}"
            )
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping, got {values!r}")
        if section == "model":
            model = _model_from_overrides(model, values)
        else:
            known = [f.name for f in dataclasses.fields(SECTIONS[section])]
            for key in values:
                if key not in known:
                    raise UserError(f"unknown {section} config key {key!r}{suggest(key, known)}")
            d[section].update(values)
    d["model"] = model.to_dict()
    return Config.from_dict(d)


def parse_override(text: str) -> dict[str, Any]:
    """`train.max_steps=500` -> {"train": {"max_steps": 500}} (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(
            f"bad override {text!r}: expected SECTION.KEY=VALUE, e.g. train.max_steps=500"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return {parts[0]: {parts[1]: value}}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config sections")
    return data


def build_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] = ()
) -> Config:
    """Resolve defaults -> preset -> YAML file -> dotted overrides into a validated Config."""
    name = preset or "tiny"
    if name in RECIPES:
        cfg = merge(Config(model=get_model_preset("tiny")), RECIPES[name])
    elif name in MODEL_PRESETS:
        cfg = Config(model=get_model_preset(name))
    else:
        raise UserError(
            f"unknown preset {name!r}{suggest(name, preset_names())}; see `lmlab config show`"
        )
    if preset:
        cfg.logging.name = cfg.logging.name or preset
    if config_file:
        cfg = merge(cfg, load_yaml(config_file))
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    cfg.validate()
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, to_yaml(cfg))


def load_config(path: str | Path) -> Config:
    """Read a resolved config (as saved in a run directory)."""
    cfg = Config.from_dict(load_yaml(path))
    cfg.validate()
    return cfg
