"""Fine-tuning as a training task: the loop of train/loop.py, with

model        the base model's architecture and weights (lmlab run or Hugging Face
             folder), plus LoRA adapters on a frozen base for method lora
data         prompt/completion, chat or text records, padded, loss on completions only
objective    sft: the model's own next-token loss over unmasked targets;
             dpo: preference pairs against the starting model (lmlab.finetune.dpo)
checkpoints  the full weights (full), or the adapters alone with a pointer to the base
             (lora); optimizer, loader and RNG state as in pretraining, so a fine-tune
             resumes exactly
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmlab.config import Config, load_config
from lmlab.errors import UserError
from lmlab.export.peft import load_peft_adapter, read_peft_config
from lmlab.finetune.data import (
    DEFAULT_CHAT_TEMPLATE,
    PreferenceLoader,
    SFTLoader,
    load_sft_splits,
    pad_id_for,
    read_chat_template,
    read_preference_pairs,
    split_records,
    tokenize_pairs,
    tokenize_records,
)
from lmlab.finetune.dpo import DPOMetrics, Reference, dpo_batch_loss, evaluate_dpo, reference_for
from lmlab.model.build import build_model
from lmlab.model.lora import apply_lora, lora_state_dict
from lmlab.model.quant import quantize_base
from lmlab.runs.checkpoint import ADAPTER_FILE, WEIGHTS_FILE, load_adapter, load_weights
from lmlab.runs.device import autocast
from lmlab.runs.load import lora_config, open_base
from lmlab.runs.source import ModelSource
from lmlab.train.distributed.runtime import Dist
from lmlab.train.distributed.state import full_weights
from lmlab.train.loop import TrainResult, train
from lmlab.train.setup import Engine, train_step
from lmlab.train.task import Loader

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _adopt_adapter_settings(cfg: Config) -> None:
    """Take rank, alpha, dropout and targets from the PEFT adapter the run starts from."""
    f = cfg.finetune
    if f.method not in ("lora", "qlora"):
        raise UserError(
            "--adapter continues a LoRA adapter: use it with --method lora, qlora or dpo-lora"
        )
    peft = read_peft_config(f.adapter)
    f.lora_rank, f.lora_alpha, f.lora_dropout = peft.rank, peft.alpha, peft.dropout
    f.lora_targets, f.lora_rslora = ",".join(peft.targets), peft.rslora


def uses_adapters(cfg: Config) -> bool:
    return cfg.finetune.method in ("lora", "qlora")


class FinetuneTask:
    """Supervised (sft) or preference (dpo) fine-tuning of a base model."""

    command = "finetune"

    def __init__(self, cfg: Config, env: Dist, log: Callable[[str], None] = print):
        f = cfg.finetune
        if not f.base:
            raise UserError("no base model: pass --from RUN_DIR|CHECKPOINT|HF_FOLDER|HF_NAME")
        if not f.data:
            raise UserError("no fine-tuning data: pass --data FILE.jsonl (or dsl:flowroll)")
        self.source: ModelSource = open_base(cfg)
        f.base_sha256 = self.source.weights_sha256
        # The base's architecture; dropout is a training choice (model.dropout, default 0).
        cfg.model = dataclasses.replace(self.source.model_config, dropout=cfg.model.dropout)
        if cfg.train.seq_len > cfg.model.context_length:
            raise UserError(
                f"train.seq_len={cfg.train.seq_len} is longer than the base model's context "
                f"({cfg.model.context_length})"
            )
        self.tokenizer = self.source.tokenizer
        self.pad_id = pad_id_for(self.tokenizer)
        self.chat_template, self.template_vars = self._chat_template()
        self.cfg = cfg
        if f.adapter:
            _adopt_adapter_settings(cfg)
        self.lora = lora_config(cfg) if uses_adapters(cfg) else None
        if self.lora is not None:
            self.lora.resolve_targets(cfg.model.family)  # unknown targets: one line, now
        self.weights_file = ADAPTER_FILE if self.lora is not None else WEIGHTS_FILE
        self.dpo_beta = f.dpo_beta if f.objective == "dpo" else None
        self.metrics = DPOMetrics()
        self.reference: Reference | None = None  # set once the model exists (build_model)
        seq_len = cfg.seq_len
        if f.objective == "dpo":
            self.train_examples, self.val_examples = self._pairs(cfg, seq_len, log)
        else:
            self.train_examples, self.val_examples = self._sft_examples(cfg, seq_len, log)
        per_step = cfg.train.micro_batch_size * env.world_size
        if len(self.train_examples) < per_step:
            raise UserError(
                f"{f.data} gives {len(self.train_examples)} training examples, fewer than one "
                f"batch of {per_step} (train.micro_batch_size x processes)"
            )
        if f.epochs > 0:  # the saved config then holds the steps, so a resume keeps them
            cfg.train.max_steps = max(1, math.ceil(f.epochs * len(self.train_examples) / per_step))
            log(
                f"{f.epochs:g} epoch(s) of {len(self.train_examples):,} examples = {cfg.train.max_steps:,} steps"
            )
            f.epochs = 0.0

    def _chat_template(self) -> tuple[str | None, dict]:
        """The base's chat template: a Hugging Face folder's own, the one an lmlab run saved,
        or None (the documented default)."""
        if self.source.kind == "hf":
            return read_chat_template(self.source.path)
        saved = self.source.path / CHAT_TEMPLATE_FILE
        return (saved.read_text(encoding="utf-8"), {}) if saved.is_file() else (None, {})

    def _sft_examples(self, cfg: Config, seq_len: int, log) -> tuple[list, list]:
        f = cfg.finetune
        splits = load_sft_splits(
            f.data,
            f.val_data or None,
            val_fraction=f.val_fraction,
            seed=cfg.train.seed,
            skip_bad=f.skip_bad,
        )
        if splits.bad_records:
            log(f"skipped {splits.bad_records} bad record(s) (--skip-bad)")
        out = []
        for name, records in (("train", splits.train), ("val", splits.val)):
            examples, stats = tokenize_records(
                records,
                self.tokenizer,
                seq_len,
                on_overflow=f.on_overflow,
                chat_template=self.chat_template,
                template_vars=self.template_vars,
            )
            _report(log, name, stats, seq_len)
            out.append(examples)
        return out[0], out[1]

    def _pairs(self, cfg: Config, seq_len: int, log) -> tuple[list, list]:
        f = cfg.finetune
        train = read_preference_pairs(f.data, skip_bad=f.skip_bad)
        if f.val_data:
            val = read_preference_pairs(f.val_data, skip_bad=f.skip_bad).records
            records = train.records
        else:
            records, val = split_records(train.records, f.val_fraction, seed=cfg.train.seed)
        out = []
        for name, pairs in (("train", records), ("val", val)):
            examples, stats = tokenize_pairs(
                pairs, self.tokenizer, seq_len, on_overflow=f.on_overflow
            )
            _report(log, name, stats, seq_len)
            out.append(examples)
        return out[0], out[1]

    # -- the Task protocol --------------------------------------------------------------

    def build_model(self, cfg: Config, checkpoint: Path | None) -> nn.Module:
        model = build_model(cfg.model)
        if self.lora is None:
            if checkpoint is not None:
                load_weights(model, checkpoint)  # a full fine-tune's checkpoint has it all
            else:
                self.source.load_into(model)
            return model
        self.source.load_into(model)
        if checkpoint is None and cfg.finetune.adapter:
            load_peft_adapter(model, cfg.finetune.adapter)  # the starting point: trained adapters
        else:
            apply_lora(model, self.lora)
        if checkpoint is not None:
            load_adapter(model, checkpoint)
        if cfg.finetune.method == "qlora":  # the frozen base in 4-bit NF4, the adapters fp32
            quantize_base(model)
        return model

    def _reference(self, engine: Engine, cfg: Config) -> Reference:
        if self.reference is None:

            def starting_model() -> nn.Module:
                model = build_model(cfg.model)
                self.source.load_into(model)
                return model.to(engine.device)

            self.reference = reference_for(engine.model, starting_model)
        return self.reference

    def train_loader(self, cfg: Config, env: Dist) -> Loader:
        loader_class = PreferenceLoader if cfg.finetune.objective == "dpo" else SFTLoader
        return loader_class(
            self.train_examples,
            cfg.train.micro_batch_size,
            cfg.seq_len,
            self.pad_id,
            seed=cfg.train.seed,
            rank=env.rank,
            world_size=env.world_size,
        )

    def step(
        self, engine: Engine, loader: Loader, accum: int, lr: float, grad_clip: float
    ) -> torch.Tensor:
        if self.dpo_beta is None:
            return train_step(engine, loader.next_batch, accum, lr, grad_clip)
        reference, beta = self._reference(engine, self.cfg), self.dpo_beta
        return train_step(
            engine,
            loader.next_batch,
            accum,
            lr,
            grad_clip,
            loss_fn=lambda batch: dpo_batch_loss(engine, batch, beta, reference, self.metrics),
        )

    def run_files(self) -> dict[str, str]:
        """Files a fine-tune keeps with the run and each checkpoint: its chat template."""
        return {CHAT_TEMPLATE_FILE: self.chat_template or DEFAULT_CHAT_TEMPLATE}

    def progress_metrics(self) -> dict[str, float]:
        """DPO's rewards and preference accuracy since the last log line."""
        return self.metrics.read()

    def evaluate(self, engine: Engine, cfg: Config) -> dict[str, float] | None:
        if not self.val_examples:
            return None
        if self.dpo_beta is None:
            return evaluate_masked_loss(engine, self.val_examples, cfg, self.pad_id)
        return evaluate_dpo(
            engine,
            self.val_examples,
            cfg.train.micro_batch_size,
            cfg.seq_len,
            self.pad_id,
            self.dpo_beta,
            self._reference(engine, cfg),
            cfg.eval.batches,
        )

    def checkpoint_weights(self, engine: Engine) -> dict[str, torch.Tensor]:
        if self.lora is None:
            return full_weights(engine.model, engine.tied)
        return {
            name: t.detach().cpu().contiguous() for name, t in lora_state_dict(engine.model).items()
        }


@torch.no_grad()
def evaluate_masked_loss(
    engine: Engine, examples: list, cfg: Config, pad_id: int
) -> dict[str, float]:
    """Mean loss over the unmasked (completion) tokens of the first eval.batches batches of
    the validation examples, in order; every token weighs the same."""
    loader = SFTLoader(
        examples, min(cfg.train.micro_batch_size, len(examples)), cfg.seq_len, pad_id, shuffle=False
    )
    batches = loader.batches_per_epoch
    if cfg.eval.batches:
        batches = min(batches, cfg.eval.batches)
    model, was_training = engine.model, engine.model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    try:
        for _ in range(max(1, batches)):
            x, y = loader.next_batch()
            x, y = x.to(engine.device), y.to(engine.device)
            with autocast(engine.device, engine.amp_dtype):
                loss = model(x, y)[1]
            n = int((y != -100).sum())
            total += loss.double() * n
            count += n
    finally:
        model.train(was_training)
    mean = total.item() / max(count, 1)
    return {"val_loss": mean, "val_perplexity": math.exp(min(mean, 700.0)), "val_tokens": count}


def _report(log, name: str, stats, seq_len: int) -> None:
    line = f"{name}: {stats.examples:,} examples"
    if stats.truncated:
        line += f", {stats.truncated:,} truncated to {seq_len + 1} tokens"
    if stats.dropped:
        line += f", {stats.dropped:,} dropped (nothing left to learn after truncation)"
    log(line)


def finetune(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    stop_at_step: int | None = None,
    log=print,
    live: bool = False,
) -> TrainResult:
    """Fine-tune `cfg.finetune.base` on `cfg.finetune.data`, or continue the run `resume`:
    an ordinary run (folder, metrics, checkpoints, exact resume) with a FinetuneTask."""

    if resume is not None:  # what the start derived from the base and the data, as saved
        saved = load_config(Path(resume) / "config.yaml")
        cfg = Config.from_dict(cfg.to_dict())
        cfg.model, cfg.finetune.base_sha256 = saved.model, saved.finetune.base_sha256
        if cfg.finetune.epochs:
            cfg.finetune.epochs, cfg.train.max_steps = 0.0, saved.train.max_steps

    def task(cfg: Config, env: Dist) -> FinetuneTask:
        return FinetuneTask(cfg, env, log if env.is_main else (lambda *a, **k: None))

    return train(
        cfg, resume=resume, stop_at_step=stop_at_step, log=log, live=live, task_factory=task
    )
