"""Each phase of the training loop, alone: set-up, step, evaluate, save, resume."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import build_config
from lmlab.runs.checkpoint import list_checkpoints, read_meta
from lmlab.runs.lock import lock_state
from lmlab.runs.status import run_status
from lmlab.train.distributed.runtime import Dist
from lmlab.train.loop import Trainer
from lmlab.train.setup import build_engine, train_step


def config(data: Path, runs: Path, *extra: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def quiet(*args, **kwargs):
    pass


def test_phases_one_at_a_time(flowroll_data: Path, tmp_path: Path):
    cfg = config(flowroll_data, tmp_path, "eval.batches=2")
    trainer = Trainer(cfg, Dist(), torch.device("cpu"), None, log=quiet)
    assert lock_state(trainer.run_dir) == "held"  # set-up opened the run folder under its lock
    assert "ultra-tiny" in trainer.describe() and "256 tokens/step" not in trainer.describe()

    before = trainer.evaluate()
    assert before["val_loss"] > 0 and trainer.state.best_val_loss == before["val_loss"]

    weights = {k: v.clone() for k, v in trainer.engine.model.state_dict().items()}
    for _ in range(5):
        loss = train_step(trainer.engine, trainer.loader.next_batch, 1, 1e-2, 1.0)
        trainer.state.step += 1
    assert loss.shape == () and torch.isfinite(loss)
    changed = trainer.engine.model.state_dict()
    assert any(not torch.equal(weights[k], changed[k]) for k in weights)

    trainer.save(val_loss=None)
    (ckpt,) = list_checkpoints(trainer.run_dir)
    assert read_meta(ckpt)["step"] == 5
    trainer.close("interrupted")
    assert run_status(trainer.run_dir)[0] == "interrupted"
    assert lock_state(trainer.run_dir) == "absent"

    resumed = Trainer(cfg, Dist(), torch.device("cpu"), trainer.run_dir, log=quiet)
    assert resumed.state.step == 5
    assert resumed.loader.state_dict() == trainer.loader.state_dict()
    for name, value in resumed.engine.model.state_dict().items():
        assert torch.equal(value, changed[name]), name
    resumed.close("interrupted")


def test_accumulated_step_matches_one_big_batch(flowroll_data: Path, tmp_path: Path):
    """The accumulation path against its plain reference: 2 x 2 sequences = 1 x 4."""
    # A large epsilon keeps AdamW's first update linear in the gradient, so rounding in
    # near-zero gradients is not blown up to a full step (as g / |g| would).
    cfg = config(
        flowroll_data, tmp_path, "model.dropout=0.0", "train.grad_clip=0.5", "train.adam_eps=1.0"
    )
    batch = torch.randint(
        0, cfg.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0)
    )
    x, y = batch[:, :-1], batch[:, 1:]
    results = []
    for halves in ([(x[:2], y[:2]), (x[2:], y[2:])], [(x, y)]):
        engine = build_engine(cfg, Dist(), torch.device("cpu"))
        feed = iter(halves)
        loss = train_step(engine, lambda feed=feed: next(feed), len(halves), 1e-2, 0.5)
        results.append((loss.item(), engine.model.state_dict()))
    (loss_a, weights_a), (loss_b, weights_b) = results
    assert abs(loss_a - loss_b) < 1e-6
    for name in weights_a:
        torch.testing.assert_close(
            weights_a[name], weights_b[name], rtol=1e-4, atol=1e-5
        )  # Adam amplifies rounding in near-zero gradients
