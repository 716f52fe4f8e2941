"""The training loop, in named phases:

    set-up      check the config against the data (and, on resume, against the run), open
                the run folder under its lock, build the engine (train/setup.py, shared
                with `lmlab bench`) and the data loader
    resume      restore weights, optimizer, loader cursor, train state and RNG from the
                newest checkpoint that verifies against its hashes (or the one named)
    step        one optimizer step (train/setup.py: train_step); a step with a non-finite
                loss or gradient changes nothing, and train.on_nonfinite decides what
                follows a run of them: stop, or roll back to the last good checkpoint
    log         loss, learning rate, tokens/s, MFU, ETA every logging.interval steps (and a
                mixture of experts' auxiliary router loss and per-expert token shares)
    evaluate    validation loss every eval.interval steps and at the end
    save        an atomic checkpoint every checkpoint.interval steps, at the end and on
                Ctrl-C / SIGTERM

`Trainer.fit` is the loop that calls them. What must survive a restart (step, tokens seen,
best val loss, the data cursor, RNG states, optimizer moments) is saved in every
checkpoint, so a resumed run continues exactly: on CPU it ends with weights bit-identical
to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.config import (
    CheckpointConfig,
    Config,
    EvalConfig,
    LoggingConfig,
    load_config,
    save_config,
)
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text
from lmlab.runs import checkpoint as ckpt_io
from lmlab.runs.device import peak_flops, peak_memory, precision_name, synchronize
from lmlab.runs.folder import new_run_dir
from lmlab.runs.lock import RunLock
from lmlab.runs.metrics import MetricsLog
from lmlab.runs.status import RunStatus, write_status
from lmlab.train.distributed import runtime
from lmlab.train.distributed.state import full_optimizer_state, load_optimizer_state
from lmlab.train.schedule import lr_at
from lmlab.train.setup import build_engine
from lmlab.train.task import PretrainTask, TaskFactory

# Settings a resumed run may change; anything else must match the saved config.
RESUMABLE_CHANGES = {
    ("train", "max_steps"),
    ("train", "device"),
    ("train", "compile"),
    ("train", "cpu_threads"),
    ("train", "strategy"),
    ("train", "activation_checkpointing"),
    ("train", "on_nonfinite"),
    ("train", "max_bad_steps"),
    ("train", "rollback_lr_factor"),
    ("train", "max_rollbacks"),
    ("train", "spike_zscore"),
    ("train", "spike_window"),
    ("train", "verify_data"),
    ("data", "path"),
    ("finetune", "base"),  # the base may move; its weights' SHA-256 must not change
    *(("eval", f.name) for f in dataclasses.fields(EvalConfig)),
    *(("checkpoint", f.name) for f in dataclasses.fields(CheckpointConfig)),
    *(("logging", f.name) for f in dataclasses.fields(LoggingConfig)),
}


@dataclass
class TrainState:
    """What the loop itself must remember across a restart."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    lr_scale: float = 1.0
    """The schedule's learning rate is multiplied by this (rollbacks lower it)."""

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.best_val_loss = (
            d["step"],
            d["tokens_seen"],
            d["best_val_loss"],
        )
        self.lr_scale = d.get("lr_scale", 1.0)  # checkpoints from before rollbacks


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    config: Config
    final_eval: dict[str, float] | None = None
    interrupted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    stop_at_step: int | None = None,
    log=print,
    live: bool = False,
    task_factory: TaskFactory = PretrainTask,
) -> TrainResult:
    """Train per `cfg`, or continue the run folder `resume`. Returns where it wrote.

    `stop_at_step` ends this invocation early (with a checkpoint), as an interruption would;
    `live` redraws one progress line in place (for terminals). Under torchrun every process
    calls this; each reads its own part of every batch and only rank 0 writes or logs.
    """
    env, device = runtime.init(cfg.train.device)
    try:
        log = log if env.is_main else _quiet
        trainer = Trainer(cfg, env, device, resume, log, live, task_factory)
        try:
            result = trainer.fit(stop_at_step)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint
            trainer.close("interrupted", "stopped at once (second Ctrl-C)")
            raise
        except BaseException as e:
            trainer.close("failed", _one_line(e))
            raise
        trainer.close("interrupted" if result.interrupted else "finished")
        return result
    finally:
        runtime.shutdown()


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _quiet(*args, **kwargs) -> None:
    pass


class Trainer:
    """One invocation of training in one run folder; its phases are the methods below."""

    # -- set-up ---------------------------------------------------------------------------

    def __init__(
        self,
        cfg: Config,
        env: runtime.Dist,
        device: torch.device,
        resume: str | Path | None,
        log=print,
        live: bool = False,
        task_factory: TaskFactory = PretrainTask,
    ):
        self.wall_start = time.perf_counter()
        self.task_factory = task_factory
        self.env, self.device, self.log, self.live = env, device, log, live
        self.lock: RunLock | None = None
        self.metrics: MetricsLog | None = None
        self._midline = False  # a live progress line is on screen, without its newline
        self.finished_before = False  # resumed a run that had already reached max_steps
        self.rollbacks = 0
        self.logged_losses: list[float] = []  # the window spike detection compares with
        try:
            self._set_up(cfg, resume)
        except BaseException:
            if self.lock is not None:  # refused before training: the run's status stays as it was
                self.lock.release()
            raise

    def _set_up(self, cfg: Config, resume: str | Path | None) -> None:
        env, device = self.env, self.device
        cfg = Config.from_dict(cfg.to_dict())  # a private copy: the vocab may be set from the data
        _absolute_paths(cfg)
        last = None
        if resume is not None:
            self.run_dir, named = _run_dir_of(Path(resume))
            self._lock_run_folder()
            last = self._checkpoint_to_resume(named)
            saved = load_config(self.run_dir / "config.yaml")
            cfg.model.vocab_size = saved.model.vocab_size  # set from the data at the start
            _check_resume_compatible(saved, cfg)
        self.task = task = self.task_factory(cfg, env)
        self.tokenizer = task.tokenizer
        if last is not None:
            _check_same_tokenizer(last, self.tokenizer)
        cfg.validate()
        self.cfg, t = cfg, cfg.train
        self.engine = build_engine(
            cfg,
            env,
            device,
            lambda: task.build_model(cfg, last),
            cpu_threads=_saved_threads(last),  # a resumed run keeps its count: bit-exact
        )
        self.num_params = self.engine.model.num_params()
        self.flops_per_token = self.engine.model.flops_per_token(cfg.seq_len)
        micro, world = t.micro_batch_size, env.world_size
        self.accum = (
            max(1, math.ceil(t.tokens_per_step / (micro * cfg.seq_len * world)))
            if t.tokens_per_step
            else 1
        )
        self.tokens_per_step = micro * cfg.seq_len * self.accum * world
        self._schedule_from_data(cfg)
        self.loader = task.train_loader(cfg, env)
        self.state = TrainState()
        if last is not None:
            self.resume_from(last)
            self.finished_before = self.state.step >= t.max_steps
        else:
            self._new_run_folder()
        if not self.finished_before:  # resuming a finished run writes nothing
            self._open_run_folder()
        self.result = TrainResult(self.run_dir, self.state, cfg)
        self.last_eval: dict[str, float] | None = None

    def _checkpoint_to_resume(self, named: Path | None) -> Path:
        """Rank 0 picks the checkpoint (`named`, or the newest that verifies), sets aside
        what it must and removes interrupted saves' leftovers; every rank learns the pick."""
        choice: Path | str | None = None
        if self.env.is_main:
            try:
                for leftover in ckpt_io.remove_leftovers(self.run_dir):
                    self.log(f"removed {leftover.name}, left by an interrupted save")
                choice = _pick_checkpoint(self.run_dir, named, self.log)
            except UserError as e:
                choice = f"error: {e}"
        choice = runtime.broadcast_object(choice, self.env)
        if isinstance(choice, str):
            raise UserError(choice.removeprefix("error: "))
        return choice

    def _lock_run_folder(self) -> None:
        """Rank 0 holds the run's lock; every rank learns whether it got it."""
        error = None
        if self.env.is_main:
            try:
                self.lock = RunLock(self.run_dir).acquire()
            except UserError as e:
                error = str(e)
        error = runtime.broadcast_object(error, self.env)
        if error:
            raise UserError(error)

    def _new_run_folder(self) -> None:
        cfg = self.cfg
        run_dir = None
        if self.env.is_main:
            run_dir = new_run_dir(cfg.logging.runs_dir, cfg.logging.name or "run")
            self.lock = RunLock(run_dir).acquire()
        self.run_dir = runtime.broadcast_object(run_dir, self.env)

    def _open_run_folder(self) -> None:
        """Rank 0 writes the config, tokenizer and status, and opens the metrics log."""
        if not self.env.is_main:
            return
        save_config(self.cfg, self.run_dir / "config.yaml")
        (self.run_dir / "tokenizer.json").write_text(self.tokenizer.to_json(), encoding="utf-8")
        for name, text in self.task.run_files().items():
            atomic_write_text(self.run_dir / name, text)
        if os.environ.get("LMLAB_RUN_DIR_FILE"):  # tells `--nproc`'s launcher where we write
            Path(os.environ["LMLAB_RUN_DIR_FILE"]).write_text(str(self.run_dir), encoding="utf-8")
        write_status(
            self.run_dir,
            "running",
            pid=os.getpid(),
            host=socket.gethostname(),
            world_size=self.env.world_size,
            command=self.task.command,
            step=self.state.step,
            max_steps=self.cfg.train.max_steps,
            error=None,
        )
        self.metrics = MetricsLog(self.run_dir, tensorboard=self.cfg.logging.tensorboard)
        self.metrics.start(self.state.step)

    def close(self, status: RunStatus, error: str | None = None) -> None:
        """Close the metrics log, record how this invocation ended and release the lock."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.lock is not None:
            if not self.finished_before:
                write_status(self.run_dir, status, step=self.state.step, error=error)
            self.lock.release()
            self.lock = None

    # -- resume ---------------------------------------------------------------------------

    def resume_from(self, ckpt: Path, quiet: bool = False) -> None:
        """Optimizer, scaler, data cursor, train state and RNG from a checkpoint (the
        weights were loaded before parallelizing, in `build_engine`)."""
        e = self.engine
        saved = ckpt_io.load_state(ckpt, map_location="cpu")
        check_data = getattr(self.task, "check_data", None)
        grew = check_data(saved.get("data")) if check_data else None
        load_optimizer_state(e.model, e.optimizer, saved["optimizer"])
        e.scaler.load_state_dict(saved["scaler"])
        self.loader.load_state_dict(saved["loader"])
        self.state.load_state_dict(saved["train"])
        _set_rng_state(saved["rng"])
        if quiet:
            return
        self.log(f"resuming {self.run_dir} from {ckpt.name} (step {self.state.step})")
        if grew:
            self.log(grew)
        before = saved.get("layout")
        if before and before["tokens_per_step"] != self.tokens_per_step:
            self.log(
                f"note: the run trained with {before['tokens_per_step']:,} tokens/step "
                f"({before['world_size']} proc), now {self.tokens_per_step:,}: set train.tokens_per_step to keep the batch"
            )

    # -- the loop -------------------------------------------------------------------------

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to train.max_steps, or until stopped; every phase is a method below."""
        t, state = self.cfg.train, self.state
        if self.finished_before:
            self.log(
                f"{self.run_dir} already trained to step {state.step} (train.max_steps="
                f"{t.max_steps}): nothing to do; set a larger train.max_steps to train on"
            )
            return self.result
        self.log(self.describe())
        check_every_step = self.device.type == "cpu"  # reading a flag back costs nothing there
        with _StopFlag(repeat_stops_at_once=not self.env.enabled) as stop:
            if state.step == 0 and self.cfg.eval.interval:  # a Ctrl-C here stops after step 1
                self.evaluate()
            self.engine.model.train()
            meter = _Meter(self.device)
            while state.step < t.max_steps:
                lr = lr_at(state.step, t) * state.lr_scale
                loss = self.task.step(self.engine, self.loader, self.accum, lr, t.grad_clip)
                meter.add(loss, self.engine.skipped, self.engine.grad_norm)
                meter.add_routing(
                    self.engine.aux_loss, self.engine.expert_load, self.engine.skipped
                )
                state.step += 1
                state.tokens_seen += self.tokens_per_step
                final = state.step == t.max_steps
                logging = state.step % self.cfg.logging.interval == 0 or final
                evaluated = self._due(self.cfg.eval.interval) or final
                stopping = runtime.any_rank(stop.requested, self.env) or (
                    stop_at_step is not None and state.step >= stop_at_step
                )
                saving = final or stopping or self._due(self.cfg.checkpoint.interval)
                if (check_every_step or logging or evaluated or saving) and self._bad_steps(meter):
                    continue  # rolled back: the loop goes on from the checkpoint's step
                if logging and self.log_progress(meter, lr):
                    continue
                with meter.paused():  # evaluating and saving are not training: not in tokens/s
                    if evaluated and self.evaluate() is False:
                        meter.reset()
                        continue
                    if saving and not self.save(
                        self.last_eval["val_loss"] if evaluated and self.last_eval else None
                    ):
                        meter.reset()
                        continue
                if stopping and not final:
                    self._stopped()
                    break
        self._end_line()
        self.result.final_eval = self.last_eval
        return self.result

    # -- non-finite steps and spikes ------------------------------------------------------

    def _bad_steps(self, meter: _Meter) -> bool:
        """Act on a run of non-finite steps as train.on_nonfinite says; True if it rolled
        back (one host read of a flag the steps kept on the device)."""
        t = self.cfg.train
        run = int(meter.bad_run.item())
        limit = 1 if t.on_nonfinite == "stop" else t.max_bad_steps
        if run < limit:
            return False
        why = f"{run} step(s) in a row with a non-finite loss or gradients"
        self._diverged(why, meter)
        return True

    def _diverged(self, why: str, meter: _Meter | None = None) -> None:
        """Roll back (on_nonfinite=rollback) or stop with a one-line error."""
        t = self.cfg.train
        if t.on_nonfinite == "rollback" and self.rollbacks < t.max_rollbacks:
            self._rollback(why)
            if meter is not None:
                meter.clear()
            return
        self._end_line()
        advice = (
            f"gave up after {self.rollbacks} rollback(s)"
            if t.on_nonfinite == "rollback"
            else "train.on_nonfinite=rollback goes back to the last good checkpoint instead"
        )
        raise UserError(
            f"training diverged at step {self.state.step}: {why}; no checkpoint was written "
            f"from it. Lower train.lr (now {t.lr:g}) or raise train.warmup_steps; {advice}"
        )

    def _rollback(self, why: str) -> None:
        """Rebuild the engine from the newest checkpoint that verifies (or the initial
        weights) and go on with the learning rate times train.rollback_lr_factor."""
        cfg, t = self.cfg, self.cfg.train
        self.rollbacks += 1
        was, scale = self.state.step, self.state.lr_scale * t.rollback_lr_factor
        ckpt: Path | str | None = None
        if self.env.is_main:
            ckpt = next(
                (c for c in reversed(ckpt_io.list_checkpoints(self.run_dir)) if _verifies(c)),
                None,
            )
        ckpt = runtime.broadcast_object(ckpt, self.env)
        self.engine = None  # type: ignore[assignment]  # free the old weights before loading
        self.engine = build_engine(
            cfg,
            self.env,
            self.device,
            lambda: self.task.build_model(cfg, ckpt),
            cpu_threads=torch.get_num_threads() if self.device.type == "cpu" else 0,
        )
        self.loader = self.task.train_loader(cfg, self.env)
        self.state.load_state_dict(TrainState().state_dict())
        if ckpt is not None:
            self.resume_from(ckpt, quiet=True)
        self.state.lr_scale = scale
        self.engine.model.train()
        self.logged_losses.clear()
        if self.metrics is not None:
            self.metrics.start(self.state.step, event="rollback")
        self._end_line()
        self.log(
            f"step {was}: {why}; rolled back to "
            f"{ckpt.name if ckpt else 'the initial weights'} (step {self.state.step}) with the "
            f"learning rate x{scale:g} (rollback {self.rollbacks} of at most {t.max_rollbacks})"
        )

    def _spike(self, loss: float) -> float | None:
        """The z-score of a logged loss against the previous train.spike_window ones when
        it exceeds train.spike_zscore (None: not a spike, or detection is off)."""
        t, window = self.cfg.train, self.logged_losses
        z = None
        if t.spike_zscore > 0 and len(window) >= t.spike_window:
            mean = sum(window) / len(window)
            std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
            if std > 0 and (loss - mean) / std > t.spike_zscore:
                z = (loss - mean) / std
        window.append(loss)
        del window[: -t.spike_window]
        return z

    def _due(self, interval: int) -> bool:
        return bool(interval) and self.state.step % interval == 0

    def _stopped(self) -> None:
        self._end_line()
        nproc = f" --nproc {self.env.world_size}" if self.env.world_size > 1 else ""
        self.log(
            f"stopped at step {self.state.step}; checkpoint saved. "
            f"Continue with: lmlab {self.task.command} --resume {self.run_dir}{nproc}"
        )
        self.result.interrupted = True

    # -- log ------------------------------------------------------------------------------

    def _schedule_from_data(self, cfg: Config) -> None:
        """train.epochs -> max_steps, train.warmup_fraction -> warmup_steps. The run folder's
        config then holds plain step counts, so a resume keeps them whatever the data does."""
        t = cfg.train
        data_tokens = getattr(self.task, "train_tokens", None)
        if t.epochs > 0:
            if data_tokens is None:
                raise UserError(
                    "train.epochs counts token shards; a fine-tune uses finetune.epochs"
                )
            t.max_steps = max(1, math.ceil(t.epochs * data_tokens / self.tokens_per_step))
            self.log(
                f"{t.epochs:g} epoch(s) of {data_tokens:,} tokens = {t.max_steps:,} steps "
                f"of {self.tokens_per_step:,} tokens"
            )
            t.epochs = 0.0
        if t.warmup_fraction > 0:
            t.warmup_steps = round(t.warmup_fraction * t.max_steps)
            t.warmup_fraction = 0.0

    def describe(self) -> str:
        """The start-up line: model, batch arithmetic, layout, device, steps, run folder."""
        cfg, t, e = self.cfg, self.cfg.train, self.engine
        micro, world = t.micro_batch_size, self.env.world_size
        layout = f"{t.strategy}, " if self.env.enabled else ""
        if t.activation_checkpointing != "none":
            layout += f"{t.activation_checkpointing} activation checkpointing, "
        describe_data = getattr(self.loader, "describe", None)  # packing, utilisation
        data = describe_data() if describe_data else ""
        return (
            f"model {cfg.model.family} {self.num_params / 1e6:.2f}M params | "
            f"{micro} seq x {self.accum} accum x {world} proc = {micro * self.accum * world} seq "
            f"x {cfg.seq_len} tokens = {self.tokens_per_step:,} tokens/step | "
            f"{data + ' | ' if data else ''}{layout}"
            f"{self.device.type} {precision_name(e.amp_dtype)}"
            f"{', ' + e.threads_note if e.threads_note else ''} | {t.max_steps} steps"
            f"{self._data_budget()} | run {self.run_dir}"
        )

    def _data_budget(self) -> str:
        """' = N tokens, T tokens/param, E epochs' for the start-up line (E with shards)."""
        total = self.cfg.train.max_steps * self.tokens_per_step
        text = f" = {total:,} tokens, {total / self.num_params:.1f} tokens/param"
        data_tokens = getattr(self.task, "train_tokens", None)
        if data_tokens:
            text += f", {total / data_tokens:.2f} epochs"
        return text

    def record(self, entry: dict[str, Any]) -> None:
        """Append a metrics record (rank 0 writes it; every rank keeps the history)."""
        entry["elapsed_s"] = time.perf_counter() - self.wall_start  # this invocation's wall clock
        self.result.history.append(entry)
        if self.metrics is not None:
            self.metrics.write(entry)

    def _routing_metrics(self, meter: _Meter, good: int) -> dict[str, Any]:
        """A mixture of experts' router numbers over the interval's good steps: the
        auxiliary loss added to the loss, each layer's share of tokens per expert and the
        smallest share (0: an expert starved)."""
        if meter.expert_load_sum is None or not good:
            return {}
        aux = runtime.mean_across_ranks(meter.aux_loss_sum, self.env).item() / good
        load = runtime.mean_across_ranks(meter.expert_load_sum, self.env) / good
        return {"aux_loss": aux, "expert_load": load.tolist(), "expert_load_min": load.min().item()}

    def log_progress(self, meter: _Meter, lr: float) -> bool:
        """The one host sync per interval (and, with several ranks, one all-reduce). True
        if a loss spike made it roll back."""
        t, world = self.cfg.train, self.env.world_size
        skipped = int(meter.skipped_sum.item())
        good = meter.steps - skipped
        loss_sum = runtime.mean_across_ranks(meter.loss_sum, self.env).item()
        loss = loss_sum / good if good else None
        # Each rank's norm is the global one already (its gradients are all-reduced).
        grad_norm = (
            meter.grad_norm_sum.item() / good
            if good and meter.grad_norm_steps == meter.steps
            else None
        )
        synchronize(self.device)
        step_time_s = meter.elapsed_s() / meter.steps
        tokens_per_s = self.tokens_per_step / step_time_s
        peak = peak_flops(self.device)
        # MFU per device: the job's FLOP/s over the peak of all its devices.
        mfu = self.flops_per_token * tokens_per_s / (peak * world) if peak else None
        z = self._spike(loss) if loss is not None else None
        entry = {
            "step": self.state.step,
            "loss": loss,
            "lr": lr,
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
            "tokens_seen": self.state.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time_s,
            "mfu": mfu,
            "peak_memory_bytes": peak_memory(self.device)[0],
            **self.task.progress_metrics(),
            **self._routing_metrics(meter, good),
        }
        if skipped:
            entry["skipped_steps"] = skipped
        if z is not None:
            entry["loss_spike_z"] = z
        self.record(entry)
        eta_s = (t.max_steps - self.state.step) * step_time_s
        line = (
            f"step {self.state.step}/{t.max_steps} | loss "
            f"{f'{loss:.4f}' if loss is not None else 'n/a'} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'} | "
            f"ETA {_duration(eta_s)}"
            + (f" | skipped {skipped} non-finite step(s)" if skipped else "")
        )
        if self.live and not skipped:
            self.log("\r" + line.ljust(100), end="")
            self._midline = True
        else:
            self._end_line()
            self.log(line)
        meter.reset()
        if z is None:
            return False
        why = f"loss spike ({loss:.4f}, {z:.1f} standard deviations above the last {t.spike_window} logged)"
        if t.on_nonfinite == "skip":
            self.log(f"warning: step {self.state.step}: {why}")
            return False
        self._diverged(why, meter)
        return True

    def _end_line(self) -> None:
        """End a live progress line before printing anything else."""
        if self._midline:
            self.log("")
            self._midline = False

    # -- evaluate -------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float] | None | bool:
        """The task's validation metrics (None when it has no validation data). A
        non-finite val loss is a divergence: False if it rolled back, else an error."""
        metrics = self.task.evaluate(self.engine, self.cfg)
        if metrics is None:
            return None
        self.record({"step": self.state.step, **metrics})
        if not math.isfinite(metrics["val_loss"]):
            self.last_eval = None
            self._diverged(f"the validation loss is {metrics['val_loss']}")
            return False
        if self.state.best_val_loss is None or metrics["val_loss"] < self.state.best_val_loss:
            self.state.best_val_loss = metrics["val_loss"]
        self.last_eval = metrics
        self._end_line()
        bpb = metrics.get("val_bits_per_byte")
        self.log(
            f"step {self.state.step}: val loss {metrics['val_loss']:.4f} | "
            f"ppl {metrics['val_perplexity']:.2f}"
            + (f" | bpb {bpb:.3f}" if bpb is not None else "")
        )
        return metrics

    # -- save -----------------------------------------------------------------------------

    def save(self, val_loss: float | None) -> bool:
        """Gather the full state (a collective under fsdp and zero1), rank 0 writes it.
        Weights that are not all finite are never written: that is a divergence (False if
        it rolled back, else an error)."""
        e, cfg = self.engine, self.cfg
        weights = self.task.checkpoint_weights(e)
        optimizer_state = full_optimizer_state(e.model, e.optimizer, self.env)
        finite = runtime.broadcast_object(
            _all_finite(weights) if self.env.is_main else None, self.env
        )
        if not finite:
            self._diverged("the weights are no longer all finite")
            return False
        if self.env.is_main:
            state = {
                "optimizer": optimizer_state,
                "scaler": e.scaler.state_dict(),
                "loader": self.loader.state_dict(),
                "train": self.state.state_dict(),
                "rng": _rng_state(),
                "layout": {
                    "world_size": self.env.world_size,
                    "strategy": cfg.train.strategy,
                    "tokens_per_step": self.tokens_per_step,
                },
            }
            data_state = getattr(self.task, "data_state", None)
            if data_state is not None:  # the manifest revision and shards it has seen
                state["data"] = data_state()
            meta = {
                "step": self.state.step,
                "tokens_seen": self.state.tokens_seen,
                "val_loss": val_loss,
            }
            if self.device.type == "cpu":
                meta["cpu_threads"] = torch.get_num_threads()
            ckpt_io.save_checkpoint(
                self.run_dir,
                weights,
                cfg,
                self.tokenizer.to_json(),
                state,
                meta,
                weights_file=self.task.weights_file,
                extra_files=self.task.run_files(),
            )
            ckpt_io.prune_checkpoints(
                self.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best
            )
            ckpt_io.remove_leftovers(self.run_dir)
            write_status(self.run_dir, "running", step=self.state.step)
        runtime.barrier(self.env)
        return True


class _Meter:
    """On the device: the loss and the gradient norm summed over the current logging
    interval's good steps, the steps it skipped, and the length of the current run of
    skipped steps; on the host, the wall clock with pauses (evaluation, checkpoints) left
    out."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.grad_norm_steps = 0  # steps that reported a norm
        self.skipped_sum = torch.zeros((), device=device)
        self.bad_run = torch.zeros((), device=device)
        self.aux_loss_sum = torch.zeros((), device=device)
        self.expert_load_sum: torch.Tensor | None = None  # (n_layer, n_expert), MoE only
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.aux_loss_sum.zero_()
        if self.expert_load_sum is not None:
            self.expert_load_sum.zero_()
        self.grad_norm_sum.zero_()
        self.grad_norm_steps = 0
        self.skipped_sum.zero_()
        self.steps, self.started = 0, time.perf_counter()

    def clear(self) -> None:
        """Forget everything (after a rollback)."""
        self.bad_run.zero_()
        self.reset()

    def add(
        self,
        step_loss: torch.Tensor,
        skipped: torch.Tensor | None,
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        if skipped is None:  # a task whose step does not report skips
            skipped = torch.zeros_like(self.skipped_sum)
        self.loss_sum += torch.where(skipped > 0, 0.0, step_loss)
        if grad_norm is not None:
            self.grad_norm_sum += torch.where(skipped > 0, 0.0, grad_norm.float())
            self.grad_norm_steps += 1
        self.skipped_sum += skipped
        self.bad_run.mul_(skipped).add_(skipped)  # +1 while skipping, back to 0 on a good step
        self.steps += 1

    def add_routing(
        self,
        aux_loss: torch.Tensor | None,
        expert_load: torch.Tensor | None,
        skipped: torch.Tensor | None,
    ) -> None:
        """A mixture of experts' step: its auxiliary loss and expert loads (unless skipped)."""
        if aux_loss is None or expert_load is None:
            return
        if skipped is None:
            skipped = torch.zeros_like(self.skipped_sum)
        if self.expert_load_sum is None:
            self.expert_load_sum = torch.zeros_like(expert_load)
        self.aux_loss_sum += torch.where(skipped > 0, 0.0, aux_loss)
        self.expert_load_sum += torch.where(skipped > 0, 0.0, expert_load)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - began


class _StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary and checkpoint.

    Alone, a second Ctrl-C stops at once. Under torchrun each worker gets the signal twice
    (from the terminal or SLURM, and forwarded by torchrun's agent, which kills workers
    still running 30 s later), so repeats are ignored there; the ranks agree on stopping
    after every step (`runtime.any_rank`).
    """

    def __init__(self, repeat_stops_at_once: bool = True):
        self.requested, self._previous = False, {}
        self.repeat_stops_at_once = repeat_stops_at_once

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and self.repeat_stops_at_once:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- set-up checks --------------------------------------------------------------------------


def _absolute_paths(cfg: Config) -> None:
    """Data paths as absolute paths, so the run's config works from any directory."""
    cfg.data.path = _absolute(cfg.data.path)
    cfg.finetune.data = _absolute(cfg.finetune.data)
    cfg.finetune.val_data = _absolute(cfg.finetune.val_data)


def _absolute(path: str) -> str:
    if not path or path.startswith("hf:") or not Path(path).exists():
        return path  # empty, a Hub name, or a missing path that set-up reports
    return os.path.abspath(path)


def _run_dir_of(path: Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint) for `--resume RUN` or `--resume RUN/checkpoints/step_N`."""
    if path.parent.name == "checkpoints" and (path / "meta.json").is_file():
        return path.parent.parent, path
    return path, None


def _verifies(ckpt: Path) -> bool:
    try:
        ckpt_io.verify_checkpoint(ckpt)
    except UserError:
        return False
    return True


def _pick_checkpoint(run_dir: Path, named: Path | None, log) -> Path:
    """The checkpoint to resume from. Named: it must verify, and newer checkpoints are set
    aside (the run continues from the named one). Else the newest that verifies; each newer
    one that does not is set aside, with a line saying so."""
    ckpts = ckpt_io.list_checkpoints(run_dir)
    if named is not None:
        ckpt_io.verify_checkpoint(named)
        for newer in [c for c in ckpts if c.name > named.name]:
            where = ckpt_io.set_aside(newer, f"set aside: the run was resumed from {named.name}")
            log(f"set {newer.name} aside ({where}): resuming from {named.name}")
        return named
    if not ckpts:
        raise UserError(f"{run_dir} has no checkpoint to resume from")
    for ckpt in reversed(ckpts):
        try:
            ckpt_io.verify_checkpoint(ckpt)
        except UserError as e:
            where = ckpt_io.set_aside(ckpt, str(e))
            log(f"{ckpt.name} fails its integrity check ({e}); set aside in {where.parent}")
            continue
        return ckpt
    raise UserError(
        f"no checkpoint of {run_dir} verifies (all were set aside in checkpoints/set_aside)"
    )


def _saved_threads(ckpt: Path | None) -> int:
    """The CPU threads a checkpoint's run trained with (0: not recorded)."""
    if ckpt is None:
        return 0
    threads = ckpt_io.read_meta(ckpt).get("cpu_threads")
    return threads if isinstance(threads, int) and threads > 0 else 0


def _all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


def _check_resume_compatible(saved: Config, new: Config) -> None:
    old_d, new_d = saved.to_dict(), new.to_dict()
    for section, values in old_d.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if new_d[section][key] != value and (section, key) not in RESUMABLE_CHANGES:
                raise UserError(
                    f"cannot resume: {section}.{key} changed from {value!r} to {new_d[section][key]!r}; "
                    "start a new run to change it"
                )


def _check_same_tokenizer(ckpt: Path, tokenizer: TextTokenizer) -> None:
    if (ckpt / "tokenizer.json").read_text(encoding="utf-8") != tokenizer.to_json():
        raise UserError("cannot resume: the data now uses a different tokenizer than the run")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if (
        "cuda" in state
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
