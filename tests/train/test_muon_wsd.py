"""train.optimizer=muon (torch.optim.Muon for the blocks' matrices, AdamW for the rest) and
the warmup-stable-decay schedule: against plain references, and resumed exactly."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.model.build import build_model
from lmlab.runs.checkpoint import list_checkpoints
from lmlab.train.loop import train
from lmlab.train.optim import Muon, MuonAdamW, muon_parameters, orthogonalise
from lmlab.train.schedule import lr_at


def schedule(**train) -> object:
    overrides = [f"train.{k}={v}" for k, v in train.items()]
    return build_config("tiny", overrides=["train.schedule=wsd", *overrides]).train


# -- the schedule ---------------------------------------------------------------------------


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    cfg = schedule(lr=1.0, warmup_steps=10, max_steps=110, decay_fraction=0.2, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warmup
    assert all(lr == 1.0 for lr in lrs[10:88])  # stable until the last 22 steps
    decay = lrs[88:]
    assert decay[0] < 1.0 and decay[-1] == pytest.approx(0.1)  # the last step at the floor
    assert np.allclose(np.diff(decay), -0.9 / 22)  # linear


def test_a_wsd_run_can_be_extended_before_its_decay_without_a_jump():
    short = schedule(warmup_steps=10, max_steps=100)
    longer = schedule(warmup_steps=10, max_steps=300)
    decay_start = 80
    assert [lr_at(s, short) for s in range(decay_start)] == [
        lr_at(s, longer) for s in range(decay_start)
    ]
    with pytest.raises(UserError, match="decay_fraction"):
        schedule(decay_fraction=0)


# -- Muon -----------------------------------------------------------------------------------


def test_orthogonalise_is_the_plain_iteration_in_fp32_on_cpu():
    torch.manual_seed(0)
    for shape in [(48, 48), (96, 48), (48, 144)]:
        g = torch.randn(*shape)
        ours = orthogonalise(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, plain_orthogonalise(g), rtol=1e-4, atol=1e-5)


def test_a_stack_of_matrices_is_orthogonalised_each_on_its_own():
    """The batched iteration Muon runs over same-shaped matrices equals one call per matrix
    and the plain iteration, wide and tall."""
    torch.manual_seed(0)
    for shape in [(32, 32), (32, 96), (96, 32)]:
        stack = torch.randn(5, *shape)
        stack[2] *= 100.0  # each matrix is scaled by its own norm, not the stack's
        batched = orthogonalise(stack, (3.4445, -4.775, 2.0315), 5, 1e-7)
        assert batched.shape == stack.shape
        for g, ours in zip(stack, batched, strict=True):
            alone = orthogonalise(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
            torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours, plain_orthogonalise(g), rtol=1e-4, atol=1e-5)


def test_muon_steps_as_torch_optim_muon_does(monkeypatch):
    """The same options, state and update as torch.optim.Muon (whose iteration, in bf16,
    is swapped for the fp32 one on its side)."""
    import torch.optim._muon as torch_muon

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", orthogonalise)
    torch.manual_seed(0)
    # Two of one shape (orthogonalised together, as one stack) and one of another.
    weights = [torch.randn(*shape, requires_grad=True) for shape in [(24, 16), (16, 40), (24, 16)]]
    twins = [w.detach().clone().requires_grad_() for w in weights]
    options = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    ours, theirs = Muon(weights, **options), torch.optim.Muon(twins, **options)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for w, t, g in zip(weights, twins, grads, strict=True):
            w.grad, t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for w, t in zip(weights, twins, strict=True):
        torch.testing.assert_close(w, t, rtol=1e-6, atol=1e-6)
    assert ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = build_model(build_config("ultra-tiny").model)
    matrices = {id(p) for p in muon_parameters(model)}
    for name, p in model.named_parameters():
        assert (id(p) in matrices) == (name.startswith("blocks.") and p.dim() == 2), name
    cfg = build_config("ultra-tiny", overrides=["train.optimizer=muon"]).train
    opt = MuonAdamW(model, cfg, torch.device("cpu"))
    counted = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert counted == model.num_params()
    assert {id(p) for p in opt.muon.param_groups[0]["params"]} == matrices


def plain_orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the nearest orthogonal matrix, in fp32."""
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / max(x.norm().item(), 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def plain_muon_step(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr, wd, mu) -> None:
    """Muon as published: Nesterov momentum, orthogonalisation, decoupled weight decay, the
    step scaled to AdamW's RMS by 0.2 * sqrt(max(rows, cols))."""
    buf.mul_(mu).add_(grad, alpha=1 - mu)
    update = plain_orthogonalise((1 - mu) * grad + mu * buf)
    p.mul_(1 - lr * wd).add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


def test_torch_orthogonalisation_is_the_plain_one_in_bf16():
    """torch.optim.Muon runs the iteration in bf16 (as the public speed-run code does):
    within a few percent of fp32, and its singular values near 1."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    for shape in [(48, 48), (96, 48), (48, 144)]:
        g = torch.randn(*shape)
        ours = _zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
        plain = plain_orthogonalise(g)
        assert (ours - plain).norm() / plain.norm() < 0.05
        singular = torch.linalg.svdvals(ours)
        assert singular.min() > 0.5 and singular.max() < 1.5


def test_muon_matches_a_plain_reference():
    """lmlab's Muon + AdamW steps equal a plain implementation (on a CPU both orthogonalise
    in fp32)."""
    torch.manual_seed(0)
    cfg = build_config(
        "ultra-tiny", overrides=["train.optimizer=muon", "train.lr=0.01", "train.weight_decay=0.1"]
    )
    model = build_model(cfg.model)
    reference = copy.deepcopy(model)
    opt = MuonAdamW(model, cfg.train, torch.device("cpu"))
    ref_matrices = muon_parameters(reference)
    ref_lm_head = [reference.lm_head.weight]  # the untied head: a matrix AdamW decays
    ref_rest = [
        p for p in reference.parameters() if all(p is not m for m in ref_matrices + ref_lm_head)
    ]
    betas = (cfg.train.beta1, cfg.train.beta2)
    ref_adamw = torch.optim.AdamW(
        [{"params": ref_lm_head, "weight_decay": 0.1}, {"params": ref_rest, "weight_decay": 0.0}],
        lr=0.01,
        betas=betas,
    )
    buffers = [torch.zeros_like(p) for p in ref_matrices]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, cfg.model.vocab_size, (4, 16))
    for _ in range(3):
        for m in (model, reference):
            m.zero_grad()
            m(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        ref_adamw.step()
        with torch.no_grad():
            for p, buf in zip(ref_matrices, buffers, strict=True):
                plain_muon_step(p, p.grad, buf, 0.01, 0.1, cfg.train.muon_momentum)
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(ours[name], start[name]), name


def test_muon_is_refused_with_sharding_strategies():
    with pytest.raises(UserError, match="optimizer=muon works with train.strategy=ddp"):
        build_config("tiny", overrides=["train.optimizer=muon", "train.strategy=fsdp"])


def tiny(data: Path, runs: Path, *extra: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.tokens_per_step=256",
            "train.max_steps=12",
            "train.warmup_steps=3",
            "train.device=cpu",
            "eval.interval=4",
            "eval.batches=2",
            "checkpoint.interval=5",
            "logging.interval=1",
            "logging.tensorboard=false",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["train.optimizer=muon"],
        ["train.schedule=wsd"],
        ["train.optimizer=muon", "train.schedule=wsd"],
    ],
    ids=["muon", "wsd", "muon-wsd"],
)
def test_exact_resume(flowroll_data: Path, tmp_path: Path, extra: list[str]):
    cfg = tiny(flowroll_data, tmp_path / "runs", *extra)
    straight = train(cfg, log=lambda *a, **k: None)
    first = train(cfg, stop_at_step=6, log=lambda *a, **k: None)
    resumed = train(cfg, resume=first.run_dir, log=lambda *a, **k: None)
    assert resumed.state.step == 12
    a = load_file(str(list_checkpoints(straight.run_dir)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(resumed.run_dir)[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    trained = [r["loss"] for r in straight.history if "loss" in r]
    assert trained[-1] < trained[0]


@pytest.mark.parametrize("preset", ["tiny", "moe-tiny"])
def test_the_planner_knows_muons_state_size(preset):
    """What MuonAdamW holds after a step is what the planner counts; in an MoE, Muon has
    the router and every expert's matrices (an expert no token chose still gets a zero
    gradient, and so a momentum buffer)."""
    from lmlab.estimate.memory import muon_matrix_params, training_memory
    from lmlab.estimate.plan import make_plan

    cfg = build_config(preset, overrides=["train.optimizer=muon", "train.device=cpu"])
    model = build_model(cfg.model)
    opt = MuonAdamW(model, cfg.train, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    held = sum(
        t.numel() * t.element_size()
        for o in opt.optimizers
        for state in o.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0  # moments and buffers, not step counters
    )
    muon = training_memory(cfg.model, 1, 16, "fp32", optimizer="muon")
    adamw = training_memory(cfg.model, 1, 16, "fp32")
    assert muon.optimizer_bytes == held
    assert adamw.optimizer_bytes - muon.optimizer_bytes == 4 * sum(
        p.numel() for p in muon_parameters(model)
    )
    assert muon_matrix_params(cfg.model) == sum(p.numel() for p in muon_parameters(model))
    plan = make_plan(cfg.model, tokens=1e6, hardware="h100", optimizer="muon")
    assert plan["memory_per_gpu"]["optimizer_bytes"] == muon.optimizer_bytes
