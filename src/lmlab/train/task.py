"""What is trained, as the loop sees it: data, model, loss, evaluation, saved weights.

The loop (train/loop.py) is the same for every kind of training; a task supplies the
parts that differ. `PretrainTask` is next-token prediction on token shards written by
`lmlab prepare`, from freshly initialised weights. Fine-tuning (lmlab.finetune) brings its
own task: a base model, prompt/completion data with loss masks, LoRA, DPO.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmlab.config import Config
from lmlab.data.loader import TokenLoader
from lmlab.data.packing import PackedLoader
from lmlab.data.shards import load_manifest, open_split, verify
from lmlab.data.tokenizer import TextTokenizer, load_tokenizer
from lmlab.errors import UserError
from lmlab.eval.metrics import bytes_per_token, evaluate_loss
from lmlab.model.attention import document_attention
from lmlab.model.build import build_model
from lmlab.runs.checkpoint import WEIGHTS_FILE, load_weights
from lmlab.runs.device import autocast
from lmlab.train.distributed.runtime import Dist
from lmlab.train.distributed.state import full_weights
from lmlab.train.setup import Engine, train_step


class Loader(Protocol):
    """A resumable source of training batches."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(Protocol):
    """The parts of training that differ between pretraining and fine-tuning."""

    command: str
    """The lmlab command that resumes such a run (`train`, `finetune`)."""
    tokenizer: TextTokenizer
    weights_file: str
    """The file a checkpoint keeps `checkpoint_weights` in."""

    def build_model(self, cfg: Config, checkpoint: Path | None) -> nn.Module:
        """The model to train, with its weights: initial ones, or the checkpoint's."""
        ...

    def train_loader(self, cfg: Config, env: Dist) -> Loader: ...

    def step(
        self, engine: Engine, loader: Loader, accum: int, lr: float, grad_clip: float
    ) -> torch.Tensor:
        """One optimizer step; the mean loss on the device."""
        ...

    def evaluate(self, engine: Engine, cfg: Config) -> dict[str, float] | None: ...

    def run_files(self) -> dict[str, str]:
        """Text files kept with the run and each checkpoint (name -> content)."""
        ...

    def progress_metrics(self) -> dict[str, float]:
        """Task-specific numbers for the next log line (averaged since the last one)."""
        ...

    def checkpoint_weights(self, engine: Engine) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model (collective under fsdp/zero1)."""
        ...


TaskFactory = Callable[[Config, Dist], Task]
"""Makes the task of a run from its config (which it may complete, e.g. the vocabulary)."""


class PretrainTask:
    """Next-token prediction on every token of the prepared shards."""

    command = "train"
    weights_file = WEIGHTS_FILE

    def __init__(self, cfg: Config, env: Dist | None = None):
        """Read the data's manifest and tokenizer; take the vocabulary from the data (or
        check that it fits the model's)."""
        if not cfg.data.path:
            raise UserError("no training data: pass --data DATA_DIR (made by `lmlab prepare`)")
        self.manifest = load_manifest(cfg.data.path)
        self.tokenizer = load_tokenizer(Path(cfg.data.path) / self.manifest["tokenizer"]["file"])
        if "train" not in self.manifest["splits"]:
            raise UserError(f"{cfg.data.path} has no train split (the manifest is damaged)")
        if self.manifest["splits"]["train"]["tokens"] == 0:
            raise UserError(f"{cfg.data.path}: the train split is empty")
        if cfg.train.verify_data:
            problems = verify(cfg.data.path)
            if problems:
                raise UserError(
                    f"{cfg.data.path} fails verification ({len(problems)} problem(s)): {problems[0]}"
                )
        vocab = self.tokenizer.vocab_size
        if cfg.data.vocab_from_data:
            cfg.model.vocab_size = vocab
        elif vocab > cfg.model.vocab_size:
            raise UserError(
                f"{cfg.data.path} uses a vocabulary of {vocab:,} tokens, larger than the model's "
                f"vocab_size {cfg.model.vocab_size:,}: set data.vocab_from_data=true or a larger model.vocab_size"
            )
        self.val_split = open_split(cfg.data.path, "val")
        self.train_tokens: int = self.manifest["splits"]["train"]["tokens"]
        """Tokens in one pass over the train split (train.epochs counts these)."""
        self.doc_mask = cfg.data.doc_mask

    def build_model(self, cfg: Config, checkpoint: Path | None) -> nn.Module:
        model = build_model(cfg.model)
        if checkpoint is not None:
            load_weights(model, checkpoint)
        return model

    def train_loader(self, cfg: Config, env: Dist) -> TokenLoader | PackedLoader:
        # Each micro-step deals `micro * world` rows out: rank r reads its own slice.
        split = open_split(cfg.data.path, "train")
        eot_id = self.manifest["tokenizer"].get("eot_id", self.tokenizer.eot_id)
        common = {
            "seed": cfg.train.seed,
            "rank": env.rank,
            "world_size": env.world_size,
            "vocab_size": cfg.model.vocab_size,
        }
        micro = cfg.train.micro_batch_size
        if cfg.data.packing == "best_fit":
            return PackedLoader(
                split, micro, cfg.seq_len, eot_id, doc_ids=cfg.data.doc_mask, **common
            )
        return TokenLoader(
            split, micro, cfg.seq_len, eot_id=eot_id if cfg.data.doc_mask else None, **common
        )

    def step(
        self, engine: Engine, loader: Loader, accum: int, lr: float, grad_clip: float
    ) -> torch.Tensor:
        if not self.doc_mask:
            return train_step(engine, loader.next_batch, accum, lr, grad_clip)

        def masked_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            # (x, y, document ids): the mask and positions are built on the device.
            x, y, doc_ids = batch
            positions, attn_mask = document_attention(doc_ids)
            return engine.step_model(x, y, positions=positions, attn_mask=attn_mask)[1]

        return train_step(engine, loader.next_batch, accum, lr, grad_clip, masked_loss)

    def evaluate(self, engine: Engine, cfg: Config) -> dict[str, float] | None:
        """Validation loss on the first eval.batches batches. Every rank evaluates the same
        batches (fsdp needs all ranks in each forward), so the number is the same at any
        world size."""
        if self.val_split.num_tokens <= cfg.seq_len:
            return None
        return evaluate_loss(
            engine.model,
            self.val_split,
            batch_size=cfg.train.micro_batch_size,
            seq_len=cfg.seq_len,
            max_batches=cfg.eval.batches,
            device=engine.device,
            bytes_per_token=bytes_per_token(self.manifest),
            autocast=autocast(engine.device, engine.amp_dtype),
        )

    def run_files(self) -> dict[str, str]:
        return {}

    def progress_metrics(self) -> dict[str, float]:
        return {}

    def checkpoint_weights(self, engine: Engine) -> dict[str, torch.Tensor]:
        return full_weights(engine.model, engine.tied)

    def data_state(self) -> dict[str, Any]:
        """What a checkpoint records of the data it trained on: the manifest revision and
        the train shards (name, tokens, SHA-256)."""
        shards = self.manifest["splits"]["train"]["shards"]
        return {
            "revision": self.manifest.get("revision", 1),
            "train_shards": [[e["file"], e["tokens"], e.get("sha256")] for e in shards],
        }

    def check_data(self, saved: dict[str, Any] | None) -> str | None:
        """Refuse (UserError) data that changed other than by appended shards; a line to
        log when it grew, else None."""
        if not saved:
            return None  # a checkpoint from before lmlab recorded its data
        now = self.data_state()
        before, current = saved["train_shards"], now["train_shards"]
        for i, entry in enumerate(before):
            if i >= len(current) or list(current[i]) != list(entry):
                what = "is gone" if i >= len(current) else "was rewritten"
                raise UserError(
                    f"cannot resume: train shard {entry[0]} {what} since the run started; "
                    "only shards appended (lmlab prepare --append) can join a run"
                )
        if len(current) == len(before):
            return None
        added = sum(e[1] for e in current[len(before) :])
        return (
            f"the train split grew by {len(current) - len(before)} shard(s), {added:,} tokens "
            f"(manifest revision {saved['revision']} -> {now['revision']}): they join the "
            "data order at the next epoch"
        )
