"""Training a mixture of experts: the trainer adds the routers' auxiliary loss, logs it and
the experts' loads, resumes exactly; and the auxiliary loss is what keeps experts fed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import build_config
from lmlab.runs.checkpoint import list_checkpoints
from lmlab.train.distributed.runtime import Dist
from lmlab.train.loop import train
from lmlab.train.setup import build_engine, train_step


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread, which no other process's load can stall in an OpenMP
    barrier (see tests/model/test_moe.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_MOE = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.d_model=32",
    "model.d_ff=32",
    "model.n_expert=4",
    "model.context_length=32",
]


def tiny_moe_config(data: Path, runs: Path, *extra: str):
    return build_config(
        "moe-tiny",
        overrides=[
            *TINY_MOE,
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.dropout=0.1",  # RNG state must resume too
            "train.micro_batch_size=4",
            "train.tokens_per_step=256",  # two micro-batches: accumulation
            "train.max_steps=8",
            "train.warmup_steps=2",
            "train.device=cpu",
            "train.cpu_threads=1",  # as one_thread: the trainer sets its own count
            "eval.interval=4",
            "eval.batches=2",
            "checkpoint.interval=4",
            "logging.interval=1",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_moe_trains_logs_its_routers_and_resumes_bit_identically(flowroll_data, tmp_path):
    cfg = tiny_moe_config(flowroll_data, tmp_path / "runs")
    quiet = dict(log=lambda *a, **k: None)
    straight = train(cfg, **quiet)
    first = train(cfg, stop_at_step=4, **quiet)
    assert first.interrupted and first.state.step == 4
    resumed = train(cfg, resume=first.run_dir, **quiet)
    assert resumed.state.step == 8

    logged = records(straight.run_dir)
    assert [r["step"] for r in logged] == list(range(1, 9))
    for r in logged:
        # The loss logged is the cross-entropy; the routers' loss is logged beside it: near
        # coef * k (0.01 * 2) while the load is even, never below it.
        assert 0.02 - 1e-6 <= r["aux_loss"] < 0.04
        load = torch.tensor(r["expert_load"])
        assert load.shape == (2, 4)
        torch.testing.assert_close(load.sum(dim=1), torch.ones(2))
        assert r["expert_load_min"] == pytest.approx(load.min().item())
    assert logged[-1]["loss"] < logged[0]["loss"]
    keys = ("step", "loss", "aux_loss", "expert_load")
    assert [{k: r[k] for k in keys} for r in records(resumed.run_dir)] == [
        {k: r[k] for k in keys} for r in logged
    ]
    a = load_file(str(list_checkpoints(straight.run_dir)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(resumed.run_dir)[-1] / "model.safetensors"))
    assert "blocks.1.mlp.experts.3.down_proj.weight" in a and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def skewed_batches(seed: int):
    """Token ids from a Zipf-like law over 16 symbols: a few tokens make most of the input,
    so a router that follows the gradient alone sends most tokens the same way."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, 17).float() ** 1.5
    while True:
        rows = torch.multinomial(weights, 32 * 17, replacement=True, generator=generator)
        rows = rows.view(32, 17)
        yield rows[:, :-1], rows[:, 1:]


def final_expert_load(coef: float, steps: int = 150) -> torch.Tensor:
    """Train a one-layer, 4-expert top-2 MoE with the trainer's own step; the expert load
    averaged over the last 20 steps."""
    cfg = build_config(
        "moe-tiny",
        overrides=[
            "model.n_layer=1",
            "model.n_head=2",
            "model.d_model=32",
            "model.d_ff=32",
            "model.n_expert=4",
            "model.vocab_size=16",
            "model.context_length=16",
            f"model.router_aux_loss_coef={coef}",
            "train.device=cpu",
            "train.cpu_threads=1",
            "train.weight_decay=0.0",
        ],
    )
    engine = build_engine(cfg, Dist(), torch.device("cpu"))
    batches = skewed_batches(seed=0)
    loads = []
    for _ in range(steps):
        train_step(engine, lambda: next(batches), accum=1, lr=1e-2, grad_clip=1.0)
        loads.append(engine.expert_load[0])
    return torch.stack(loads[-20:]).mean(dim=0)


def test_without_the_auxiliary_loss_experts_starve_and_with_it_the_load_evens_out():
    # Measured (seed 0, 150 steps): without it [0.0, 0.0, 0.5, 0.5] (two experts starve,
    # the other two split every token); with 0.1, [0.225, 0.253, 0.244, 0.278].
    starved = final_expert_load(coef=0.0)
    assert starved.min() < 0.01  # some expert gets under 1% of the routed tokens
    balanced = final_expert_load(coef=0.1)
    assert balanced.min() > 0.15  # every expert gets at least 15% (25% is even)
    assert balanced.max() < 0.35


def test_plan_counts_muons_state_and_lora_is_refused_in_one_line(flowroll_data, tmp_path, capsys):
    """Muon plans on an MoE (the state of the matrices it trains); LoRA, which does not
    adapt MoE models, is refused by plan, bench and finetune in one line that says so."""
    from lmlab.cli import main as cli_main

    def run(argv: list[str]) -> tuple[int, str, list[str]]:
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        out, err = capsys.readouterr()
        return info.value.code, out, err.strip().splitlines()

    code, out, _ = run(["plan", "--preset", "moe-tiny", "--optimizer", "muon"])
    assert code == 0 and "Muon + AdamW state" in out

    cfg = tiny_moe_config(flowroll_data, tmp_path / "runs", "train.max_steps=2", "eval.interval=0")
    base = train(cfg, log=lambda *a, **k: None).run_dir
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"prompt": f"[{i}] | sort =>", "completion": f" [{i}]"}) + "\n"
            for i in range(20)
        )
    )
    for command in (
        ["plan", "--preset", "moe-tiny", "--method", "lora"],
        ["bench", "--preset", "moe-tiny", "--method", "qlora", "--device", "cpu"],
        ["finetune", "--from", str(base), "--data", str(sft), "--method", "lora",
         f"logging.runs_dir={tmp_path / 'ft'}", "train.device=cpu"],
    ):  # fmt: skip
        code, _, err = run(command)
        assert code == 2 and len(err) == 1, (command, err)
        assert "do not support moe (mixture-of-experts) models" in err[0], err
        assert "--method full" in err[0]
    assert not (tmp_path / "ft").exists() or not any((tmp_path / "ft").rglob("config.yaml"))
