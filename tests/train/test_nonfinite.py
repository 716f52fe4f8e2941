"""Non-finite losses and gradients (issue 14, item 1): a bad step changes nothing, and
train.on_nonfinite decides what a run of them leads to. The poison is injected by a task
whose loss turns NaN (or jumps) on chosen calls, so every case is deterministic."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.runs.checkpoint import list_checkpoints, load_state
from lmlab.runs.metrics import MetricsLog, read_metrics, read_records
from lmlab.runs.status import read_recorded
from lmlab.train.loop import train
from lmlab.train.setup import build_engine, train_step
from lmlab.train.task import PretrainTask


def config(data: Path, runs: Path, *extra: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.max_steps=16",
            "train.warmup_steps=2",
            "train.device=cpu",
            "eval.interval=0",
            "eval.batches=2",
            "checkpoint.interval=4",
            "checkpoint.keep_last=10",
            "logging.interval=2",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def poisoned(calls: set[int], factor: float = math.nan):
    """A task factory: the loss is multiplied by `factor` on these step calls (1-based,
    counted across rollbacks, so a poison is met once, as a transient fault would be)."""

    class Poisoned(PretrainTask):
        count = 0

        def step(self, engine, loader, accum, lr, grad_clip):
            Poisoned.count += 1
            scale = factor if Poisoned.count in calls else 1.0

            def loss_fn(batch):
                return engine.step_model(*batch)[1] * scale

            return train_step(engine, loader.next_batch, accum, lr, grad_clip, loss_fn=loss_fn)

    return Poisoned


def strict_json_lines(run_dir: Path) -> list[dict]:
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}")

    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def all_finite(ckpt: Path) -> bool:
    weights = load_file(str(ckpt / "model.safetensors"))
    return all(bool(torch.isfinite(t).all()) for t in weights.values())


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused-found_inf"])
def test_a_nonfinite_step_changes_nothing(flowroll_data: Path, tmp_path: Path, fused: bool):
    """Weights and AdamW's state (moments, step count) are untouched by a NaN step; the
    fused optimizer skips on the device through found_inf, without a host read."""
    cfg = config(flowroll_data, tmp_path)
    task = PretrainTask(cfg)
    from lmlab.train.distributed import runtime

    env, device = runtime.init("cpu")
    engine = build_engine(cfg, env, device)
    if fused:
        groups = engine.optimizer.param_groups
        engine.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
            lr=1e-3,
            fused=True,
        )
    loader = task.train_loader(cfg, env)
    train_step(engine, loader.next_batch, 1, 1e-3, 1.0)
    assert engine.skipped.item() == 0.0
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    moments = {
        id(p): {k: v.clone() for k, v in s.items()} for p, s in engine.optimizer.state.items()
    }
    for poison in (math.nan, math.inf):
        loss = train_step(
            engine,
            loader.next_batch,
            1,
            1e-3,
            1.0,
            loss_fn=lambda b, poison=poison: engine.step_model(*b)[1] * poison,
        )
        assert not math.isfinite(loss.item()) and engine.skipped.item() == 1.0
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, s in engine.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k
    train_step(engine, loader.next_batch, 1, 1e-3, 1.0)  # and a good step still trains
    assert engine.skipped.item() == 0.0
    assert any(not torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


def test_skip_goes_on_and_metrics_stay_strict_json(flowroll_data: Path, tmp_path: Path):
    cfg = config(flowroll_data, tmp_path)
    result = train(cfg, log=lambda *a, **k: None, task_factory=poisoned({3, 4}))
    assert result.state.step == 16
    lines = strict_json_lines(result.run_dir)
    skipped = {r["step"]: r["skipped_steps"] for r in lines if "skipped_steps" in r}
    assert skipped == {4: 2}  # steps 3 and 4 sit in the logging interval ending at 4
    assert next(r for r in lines if r.get("step") == 4 and "loss" in r)["loss"] is None
    assert all(all_finite(c) for c in list_checkpoints(result.run_dir))


def test_skip_stops_after_max_bad_steps_in_a_row(flowroll_data: Path, tmp_path: Path):
    cfg = config(flowroll_data, tmp_path, "train.max_bad_steps=3")
    with pytest.raises(UserError, match="training diverged at step 8: 3 step"):
        train(cfg, log=lambda *a, **k: None, task_factory=poisoned(set(range(6, 100))))
    run = next((tmp_path).glob("*/*"))
    assert read_recorded(run)["status"] == "failed"
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004"]  # nothing from NaN
    strict_json_lines(run)


def test_stop_stops_at_the_first(flowroll_data: Path, tmp_path: Path):
    cfg = config(flowroll_data, tmp_path, "train.on_nonfinite=stop")
    with pytest.raises(UserError, match="training diverged at step 7"):
        train(cfg, log=lambda *a, **k: None, task_factory=poisoned({7}))


def test_rollback_goes_back_with_a_lower_lr(flowroll_data: Path, tmp_path: Path):
    cfg = config(flowroll_data, tmp_path, "train.on_nonfinite=rollback", "train.max_bad_steps=2")
    lines: list[str] = []
    result = train(
        cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))), task_factory=poisoned({6, 7})
    )
    assert result.state.step == 16 and result.state.lr_scale == 0.5
    assert any(
        "rolled back to step_00000004 (step 4) with the learning rate x0.5" in x for x in lines
    )
    history = read_metrics(result.run_dir)
    steps = [r["step"] for r in history if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(2, 17, 2))  # no repeats after rolling back
    assert any(r.get("event") == "rollback" for r in read_records(result.run_dir))
    assert load_state(list_checkpoints(result.run_dir)[-1])["train"]["lr_scale"] == 0.5
    # Rolled back at step 7 to step 4, the schedule then runs at half the learning rate.
    lrs = {r["step"]: r["lr"] for r in history if "lr" in r}
    plain = {
        r["step"]: r["lr"]
        for r in read_metrics(train(config(flowroll_data, tmp_path / "b"), log=print).run_dir)
        if "lr" in r
    }
    assert lrs[4] == plain[4] and lrs[16] == pytest.approx(plain[16] * 0.5)


def test_rollback_before_any_checkpoint_restarts_from_the_initial_weights(
    flowroll_data: Path, tmp_path: Path
):
    cfg = config(flowroll_data, tmp_path, "train.on_nonfinite=rollback", "train.max_bad_steps=1")
    lines: list[str] = []
    result = train(
        cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))), task_factory=poisoned({2})
    )
    assert result.state.step == 16
    assert any("rolled back to the initial weights (step 0)" in x for x in lines)


def test_rollback_gives_up_after_max_rollbacks(flowroll_data: Path, tmp_path: Path):
    cfg = config(
        flowroll_data,
        tmp_path,
        "train.on_nonfinite=rollback",
        "train.max_bad_steps=1",
        "train.max_rollbacks=2",
    )
    with pytest.raises(UserError, match="gave up after 2 rollback"):
        train(cfg, log=lambda *a, **k: None, task_factory=poisoned(set(range(6, 1000))))


def test_a_loss_spike_rolls_back(flowroll_data: Path, tmp_path: Path):
    cfg = config(
        flowroll_data,
        tmp_path,
        "train.on_nonfinite=rollback",
        "train.spike_zscore=4",
        "train.spike_window=3",
        "logging.interval=1",
    )
    lines: list[str] = []
    result = train(
        cfg,
        log=lambda *a, **k: lines.append(" ".join(map(str, a))),
        task_factory=poisoned({10}, factor=50.0),
    )
    assert result.state.step == 16
    assert any("loss spike" in x and "rolled back to step_00000008" in x for x in lines), lines


def test_metrics_log_writes_nonfinite_numbers_as_null(tmp_path: Path):
    log = MetricsLog(tmp_path)
    log.start(0)
    log.write({"step": 1, "loss": math.nan, "lr": 1e-3, "val_loss": -math.inf})
    log.close()
    last = strict_json_lines(tmp_path)[-1]
    assert last == {
        "step": 1,
        "loss": None,
        "lr": 1e-3,
        "val_loss": None,
        "nonfinite": ["loss", "val_loss"],
    }


# The gradient norm a step reports (and the metrics log records): the global norm of the
# gradients before clipping, averaged over a logging interval's good steps.


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_the_step_reports_the_norm_before_clipping(
    flowroll_data: Path, tmp_path: Path, grad_clip: float
):
    cfg = config(flowroll_data, tmp_path)
    task = PretrainTask(cfg)
    from lmlab.train.distributed import runtime

    env, device = runtime.init("cpu")
    engine = build_engine(cfg, env, device)
    reference = copy.deepcopy(engine.model)
    loader, twin = task.train_loader(cfg, env), task.train_loader(cfg, env)
    reference(*twin.next_batch())[1].backward()  # the plain computation, on the same batch
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters()))
    train_step(engine, loader.next_batch, 1, 1e-3, grad_clip)
    assert engine.grad_norm is not None
    assert engine.grad_norm.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 10 * 1e-3  # so the clipped run really clipped


def test_the_metrics_log_records_the_mean_norm_of_good_steps(flowroll_data: Path, tmp_path: Path):
    cfg = config(flowroll_data, tmp_path, "train.max_steps=8")
    run = train(cfg, task_factory=poisoned({3}), log=lambda *a, **k: None).run_dir
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x and "val_loss" not in x]
    assert [x["step"] for x in logged] == [2, 4, 6, 8]
    assert all(x["grad_norm"] > 0 for x in logged)  # the NaN step 3 is left out of its mean
    assert logged[1]["skipped_steps"] == 1
