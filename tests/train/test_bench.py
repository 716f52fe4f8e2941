import json

import pytest

from lmlab.cli import main as cli_main


def test_bench_prints_json_on_cpu(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "bench",
                "--preset",
                "ultra-tiny",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--seq-len",
                "32",
                "--micro-batch",
                "2",
                "--device",
                "cpu",
            ]
        )
    assert info.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0
    assert result["seq_len"] == 32 and result["micro_batch"] == 2 and result["params"] > 0
    assert (
        result["mfu"] is None and result["peak_flops"] is None
    )  # no known peak for a CPU: n/a, never a guess
    assert result["peak_memory_bytes"] > 0


def test_bench_rejects_bad_values(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "--preset", "ultra-tiny", "--steps", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "--preset", "nope"])
    assert info.value.code == 2 and "unknown preset" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_a_strategy_in_two_processes():
    import os
    import subprocess
    import sys

    args = ["--preset", "ultra-tiny", "--steps", "2", "--warmup", "1", "--seq-len", "32"]
    args += ["--micro-batch", "2", "--device", "cpu", "--nproc", "2", "--strategy", "zero1"]
    done = subprocess.run(
        [sys.executable, "-m", "lmlab", "bench", *args],
        env={**os.environ, "GOMP_SPINCOUNT": "1000"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one report, from rank 0
    assert result["world_size"] == 2 and result["strategy"] == "zero1"
    assert result["tokens_per_s"] > 0 and result["peak_memory_bytes"] > 0


def test_bench_counts_an_moe_on_its_active_flops(capsys, monkeypatch):
    """FLOPs per token, and so MFU, of an MoE come from its active weights (the moe closed
    form), not from every expert it holds."""
    from dataclasses import replace

    from lmlab.config import build_config
    from lmlab.model import moe
    from lmlab.train import bench

    monkeypatch.setattr(bench, "peak_flops", lambda device: 1e12)  # a CPU with a known peak
    with pytest.raises(SystemExit) as info:
        cli_main(
            ["bench", "--preset", "moe-tiny", "--steps", "2", "--warmup", "1"]
            + ["--seq-len", "32", "--micro-batch", "2", "--device", "cpu", "train.cpu_threads=1"]
        )
    assert info.value.code == 0
    result = json.loads(capsys.readouterr().out)
    cfg = build_config("moe-tiny").model
    assert result["flops_per_token"] == moe.flops_per_token(cfg, 32)
    assert result["params"] == moe.param_count(cfg)
    assert result["active_params"] == moe.active_param_count(cfg) < result["params"]
    every_expert = moe.flops_per_token(replace(cfg, n_expert_per_token=cfg.n_expert), 32)
    assert result["flops_per_token"] < every_expert
    assert result["mfu"] == pytest.approx(
        moe.flops_per_token(cfg, 32) * result["tokens_per_s"] / 1e12
    )
