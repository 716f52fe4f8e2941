"""The training loop: one plain function, read top to bottom.

    data dir -> loader -> model -> AdamW (+ warmup/cosine) -> checkpoints, metrics

Training state that must survive a restart (step, tokens seen, best val loss, the data
cursor, RNG states, optimizer moments) is saved in every checkpoint, so `resume` continues
exactly: on CPU a resumed run ends with bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
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
from lmlab.data.loader import TokenLoader
from lmlab.data.shards import load_manifest, open_split
from lmlab.data.tokenizer import load_tokenizer
from lmlab.errors import UserError
from lmlab.eval.metrics import bytes_per_token, evaluate_loss
from lmlab.model.build import build_model
from lmlab.runs import checkpoint as ckpt_io
from lmlab.runs.device import (
    autocast,
    autocast_dtype,
    peak_flops,
    precision_name,
    synchronize,
)
from lmlab.runs.folder import new_run_dir
from lmlab.train.distributed import runtime
from lmlab.train.distributed.parallelize import (
    build_strategy_optimizer,
    gradient_sync,
    parallelize,
)
from lmlab.train.distributed.state import (
    full_optimizer_state,
    full_weights,
    load_optimizer_state,
    tied_duplicates,
)
from lmlab.train.schedule import lr_at

# Settings a resumed run may change; anything else must match the saved config.
RESUMABLE_CHANGES = {
    ("train", "max_steps"),
    ("train", "device"),
    ("train", "compile"),
    ("train", "cpu_threads"),
    ("train", "strategy"),
    ("train", "activation_checkpointing"),
    ("data", "path"),
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

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.best_val_loss = (
            d["step"],
            d["tokens_seen"],
            d["best_val_loss"],
        )


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    config: Config
    final_eval: dict[str, float] | None = None
    interrupted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


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


def _data_and_vocab(cfg: Config):
    if not cfg.data.path:
        raise UserError("no training data: pass --data DATA_DIR (made by `lmlab prepare`)")
    manifest = load_manifest(cfg.data.path)
    tokenizer = load_tokenizer(Path(cfg.data.path) / manifest["tokenizer"]["file"])
    if manifest["splits"]["train"]["tokens"] == 0:
        raise UserError(f"{cfg.data.path}: the train split is empty")
    if cfg.data.vocab_from_data:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{cfg.data.path} uses a vocabulary of {tokenizer.vocab_size:,} tokens, larger than the "
            f"model's vocab_size {cfg.model.vocab_size:,}: set data.vocab_from_data=true or a larger model.vocab_size"
        )
    return manifest, tokenizer


def train(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    stop_at_step: int | None = None,
    log=print,
    live: bool = False,
) -> TrainResult:
    """Train per `cfg`, or continue the run folder `resume`. Returns where it wrote.

    `stop_at_step` ends this invocation early (with a checkpoint), as an interruption would;
    `live` redraws one progress line in place (for terminals). Under torchrun every process
    calls this; each reads its own part of every batch and only rank 0 writes or logs.
    """
    env, device = runtime.init(cfg.train.device)
    try:
        return _train(cfg, env, device, resume, stop_at_step, log if env.is_main else _quiet, live)
    finally:
        runtime.shutdown()


def _quiet(*args, **kwargs) -> None:
    pass


def _train(
    cfg: Config,
    env: runtime.Dist,
    device: torch.device,
    resume: str | Path | None,
    stop_at_step: int | None,
    log,
    live: bool,
) -> TrainResult:
    wall_start = time.perf_counter()
    cfg = Config.from_dict(cfg.to_dict())  # a private copy: the vocab may be set from the data
    if resume is not None:
        run_dir = Path(resume)
        ckpts = ckpt_io.list_checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"{run_dir} has no checkpoint to resume from")
        saved = load_config(run_dir / "config.yaml")
        cfg.model.vocab_size = saved.model.vocab_size  # set from the data at the start
        _check_resume_compatible(saved, cfg)
    manifest, tokenizer = _data_and_vocab(cfg)
    if resume is not None and ckpts:
        saved_tok = (ckpts[-1] / "tokenizer.json").read_text(encoding="utf-8")
        if saved_tok != tokenizer.to_json():
            raise UserError(
                f"cannot resume: {cfg.data.path} uses a different tokenizer than the run"
            )
    cfg.validate()

    t = cfg.train
    if device.type == "cpu" and t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_dtype(device, t.precision)
    torch.manual_seed(t.seed)  # the same on every rank: every replica starts identical
    random.seed(t.seed)

    # Build, load weights, then parallelize (checkpointing -> compile -> strategy), then
    # the optimizer over the parameters the strategy left (sharded ones under fsdp).
    model = build_model(cfg.model).to(device)
    num_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.seq_len)
    tied = tied_duplicates(model)
    if resume is not None:
        last = ckpts[-1]
        ckpt_io.load_weights(model, last)
        saved_state = ckpt_io.load_state(last, map_location="cpu")
    step_model = parallelize(model, t, env, device, amp_dtype)
    optimizer = build_strategy_optimizer(model, t, env, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    seq_len, micro, world = cfg.seq_len, t.micro_batch_size, env.world_size
    accum = (
        max(1, math.ceil(t.tokens_per_step / (micro * seq_len * world))) if t.tokens_per_step else 1
    )
    # Each micro-step deals `micro * world` windows out: rank r reads its own slice.
    loader = TokenLoader(
        open_split(cfg.data.path, "train"),
        micro,
        seq_len,
        seed=t.seed,
        rank=env.rank,
        world_size=world,
    )
    val_split = open_split(cfg.data.path, "val")
    can_eval = val_split.num_tokens > seq_len
    state = TrainState()
    tokens_per_step = micro * seq_len * accum * world

    if resume is not None:
        load_optimizer_state(model, optimizer, saved_state["optimizer"])
        scaler.load_state_dict(saved_state["scaler"])
        loader.load_state_dict(saved_state["loader"])
        state.load_state_dict(saved_state["train"])
        _set_rng_state(saved_state["rng"])
        log(f"resuming {run_dir} from {last.name} (step {state.step})")
        before = saved_state.get("layout")
        if before and before["tokens_per_step"] != tokens_per_step:
            log(
                f"note: the run trained with {before['tokens_per_step']:,} tokens/step "
                f"({before['world_size']} proc), now {tokens_per_step:,}: set train.tokens_per_step to keep the batch"
            )
        del saved_state
    else:
        run_dir = (
            new_run_dir(cfg.logging.runs_dir, cfg.logging.name or "run") if env.is_main else None
        )
        run_dir = runtime.broadcast_object(run_dir, env)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        if os.environ.get("LMLAB_RUN_DIR_FILE"):  # tells `--nproc`'s launcher where we write
            Path(os.environ["LMLAB_RUN_DIR_FILE"]).write_text(str(run_dir), encoding="utf-8")

    peak = peak_flops(device)
    amp_name = precision_name(amp_dtype)
    layout = f"{t.strategy}, " if env.enabled else ""
    if t.activation_checkpointing != "none":
        layout += f"{t.activation_checkpointing} activation checkpointing, "
    log(
        f"model {cfg.model.family} {num_params / 1e6:.2f}M params | "
        f"{micro} seq x {accum} accum x {world} proc = {micro * accum * world} seq x {seq_len} tokens "
        f"= {tokens_per_step:,} tokens/step | {layout}{device.type} {amp_name} | {t.max_steps} steps | run {run_dir}"
    )

    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if env.is_main else None  # noqa: SIM115
    tb = _tensorboard(run_dir) if cfg.logging.tensorboard and env.is_main else None
    result = TrainResult(run_dir, state, cfg)

    def record(entry: dict[str, Any]) -> None:
        entry["elapsed_s"] = time.perf_counter() - wall_start  # wall clock of this invocation
        result.history.append(entry)
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()
        if tb is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    tb.add_scalar(key, value, entry["step"])

    bpt = bytes_per_token(manifest)

    def run_eval() -> dict[str, float] | None:
        # Every rank evaluates the same batches (fsdp needs all ranks in each forward), so
        # the number is the same at any world size.
        if not can_eval:
            return None
        metrics = evaluate_loss(
            model,
            val_split,
            batch_size=micro,
            seq_len=seq_len,
            max_batches=cfg.eval.batches,
            device=device,
            bytes_per_token=bpt,
            autocast=autocast(device, amp_dtype),
        )
        record({"step": state.step, **metrics})
        if state.best_val_loss is None or metrics["val_loss"] < state.best_val_loss:
            state.best_val_loss = metrics["val_loss"]
        return metrics

    last_eval: dict[str, float] | None = None

    def save(val_loss: float | None) -> None:
        # Gathering is collective (fsdp, zero1): every rank takes part, rank 0 writes.
        weights = full_weights(model, tied)
        optimizer_state = full_optimizer_state(model, optimizer, env)
        if env.is_main:
            full = {
                "optimizer": optimizer_state,
                "scaler": scaler.state_dict(),
                "loader": loader.state_dict(),
                "train": state.state_dict(),
                "rng": _rng_state(),
                "layout": {
                    "world_size": world,
                    "strategy": t.strategy,
                    "tokens_per_step": tokens_per_step,
                },
            }
            meta = {"step": state.step, "tokens_seen": state.tokens_seen, "val_loss": val_loss}
            ckpt_io.save_checkpoint(run_dir, weights, cfg, tokenizer.to_json(), full, meta)
            ckpt_io.prune_checkpoints(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
        runtime.barrier(env)

    if state.step == 0 and cfg.eval.interval:
        last_eval = run_eval()
        if last_eval:
            log(f"step 0: val loss {last_eval['val_loss']:.4f}")

    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on the device; read back only when logging
    interval_start, interval_steps = time.perf_counter(), 0
    with _StopFlag(repeat_stops_at_once=not env.enabled) as stop:
        try:
            while state.step < t.max_steps:
                lr = lr_at(state.step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro_step in range(accum):
                    x, y = loader.next_batch()
                    if device.type == "cuda":
                        x, y = (
                            x.pin_memory().to(device, non_blocking=True),
                            y.pin_memory().to(device, non_blocking=True),
                        )
                    else:
                        x, y = x.to(device), y.to(device)
                    with gradient_sync(step_model, sync=micro_step == accum - 1):
                        with autocast(device, amp_dtype):
                            loss = step_model(x, y)[1]  # the logits are not kept alive
                        scaler.scale(loss / accum).backward()
                    loss_sum += loss.detach() / accum
                if t.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip, foreach=True)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.tokens_seen += tokens_per_step
                interval_steps += 1

                final = state.step == t.max_steps
                if state.step % cfg.logging.interval == 0 or final:
                    # The one host sync per interval (and, with several ranks, one all-reduce).
                    loss_value = runtime.mean_across_ranks(loss_sum, env).item() / interval_steps
                    synchronize(device)
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = tokens_per_step * interval_steps / elapsed
                    # MFU per device: the job's FLOP/s over the peak of all its devices.
                    mfu = flops_per_token * tokens_per_s / (peak * world) if peak else None
                    eta_s = (t.max_steps - state.step) * elapsed / interval_steps
                    record(
                        {
                            "step": state.step,
                            "loss": loss_value,
                            "lr": lr,
                            "tokens_seen": state.tokens_seen,
                            "tokens_per_s": tokens_per_s,
                            "step_time_s": elapsed / interval_steps,
                            "mfu": mfu,
                        }
                    )
                    line = (
                        f"step {state.step}/{t.max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                        f"{tokens_per_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'} | "
                        f"ETA {_duration(eta_s)}"
                    )
                    log(("\r" + line.ljust(100)) if live else line, **({"end": ""} if live else {}))
                    loss_sum.zero_()
                    interval_start, interval_steps = time.perf_counter(), 0

                # Evaluation and checkpointing are not training: keep them out of tokens/s.
                paused = time.perf_counter()
                evaluated = False
                if (cfg.eval.interval and state.step % cfg.eval.interval == 0) or final:
                    last_eval, evaluated = run_eval(), True
                    if last_eval:
                        log(
                            ("\n" if live else "")
                            + f"step {state.step}: val loss {last_eval['val_loss']:.4f} | "
                            f"ppl {last_eval['val_perplexity']:.2f} | "
                            f"bpb {last_eval.get('val_bits_per_byte', float('nan')):.3f}"
                        )
                stopping = runtime.any_rank(stop.requested, env) or (
                    stop_at_step is not None and state.step >= stop_at_step
                )
                if (
                    final
                    or stopping
                    or (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0)
                ):
                    save(last_eval["val_loss"] if evaluated and last_eval else None)
                if stopping and not final:
                    result.interrupted = True
                    log(
                        ("\n" if live else "")
                        + f"stopped at step {state.step}; checkpoint saved. Continue with: lmlab train --resume {run_dir}"
                    )
                    break
                interval_start += time.perf_counter() - paused
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if tb is not None:
                tb.close()
    if live:
        log("")
    result.final_eval = last_eval
    return result


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
