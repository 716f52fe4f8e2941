import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmlab.cli import main as cli_main
from lmlab.config import build_config
from lmlab.data.loader import TokenLoader
from lmlab.data.shards import open_split
from lmlab.errors import UserError
from lmlab.runs.checkpoint import list_checkpoints, load_state, read_meta
from lmlab.train.loop import train
from lmlab.train.optim import param_groups
from lmlab.train.schedule import lr_at


def tiny_config(data: Path, runs: Path, *extra: str):
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            "model.context_length=32",
            "model.dropout=0.1",
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


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


@pytest.mark.parametrize(
    "packing", [[], ["data.packing=best_fit", "data.doc_mask=true"]], ids=["concat", "best_fit"]
)
def test_exact_resume_is_bit_identical(flowroll_data: Path, tmp_path: Path, packing: list[str]):
    cfg = tiny_config(flowroll_data, tmp_path / "runs", *packing)
    straight = train(cfg, log=lambda *a, **k: None)
    first = train(cfg, stop_at_step=6, log=lambda *a, **k: None)
    assert first.interrupted and first.state.step == 6
    resumed = train(cfg, resume=first.run_dir, log=lambda *a, **k: None)
    assert resumed.run_dir == first.run_dir and resumed.state.step == 12
    assert losses(straight.run_dir) == losses(resumed.run_dir)
    assert len(losses(straight.run_dir)) == 12
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_training_learns_and_keeps_checkpoints(flowroll_data: Path, tmp_path: Path):
    cfg = tiny_config(
        flowroll_data, tmp_path / "runs", "train.max_steps=20", "checkpoint.keep_last=1"
    )
    result = train(cfg, log=lambda *a, **k: None)
    evals = [r for r in result.history if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert {"val_perplexity", "val_bits_per_byte"} <= evals[-1].keys()
    kept = list_checkpoints(result.run_dir)
    assert kept[-1].name == "step_00000020"
    assert len(kept) <= 2  # the newest plus, if different, the best by val loss
    meta = read_meta(kept[-1])
    assert meta["step"] == 20 and meta["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert not [p for p in (result.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_crafted_pickle_is_refused_not_executed(flowroll_data: Path, tmp_path: Path):
    result = train(
        tiny_config(flowroll_data, tmp_path / "runs", "train.max_steps=2"), log=lambda *a, **k: None
    )
    ckpt = list_checkpoints(result.run_dir)[-1]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Payload()}, ckpt / "state.pt")
    with pytest.raises(UserError, match="refusing to load"):
        load_state(ckpt)
    with pytest.raises(UserError):
        train(
            tiny_config(flowroll_data, tmp_path / "runs", "train.max_steps=4"),
            resume=result.run_dir,
            log=lambda *a, **k: None,
        )
    assert not marker.exists()


def test_resume_refuses_incompatible_changes(flowroll_data: Path, tmp_path: Path):
    cfg = tiny_config(flowroll_data, tmp_path / "runs", "train.max_steps=2")
    result = train(cfg, log=lambda *a, **k: None)
    changed = tiny_config(flowroll_data, tmp_path / "runs", "train.max_steps=4", "model.n_layer=3")
    with pytest.raises(UserError, match="model.n_layer changed from 2 to 3"):
        train(changed, resume=result.run_dir, log=lambda *a, **k: None)
    longer = tiny_config(flowroll_data, tmp_path / "runs", "train.max_steps=4")
    assert train(longer, resume=result.run_dir, log=lambda *a, **k: None).state.step == 4


def cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return info.value.code


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data", "{missing}"], "does not exist"),
        (["--data", "{empty}"], "not a prepared data directory"),
        (
            ["--data", "{data}", "data.vocab_from_data=false", "model.vocab_size=10"],
            "larger than the model's vocab_size",
        ),
        (["--data", "{data}", "train.max_stpes=3"], "did you mean 'max_steps'"),
        (["--data", "{data}", "train.lr=fast"], "train.lr must be a number"),
        (["--data", "{data}", "model.d_model=50"], "not divisible by n_head"),
        (["--data", "{data}", "nodot=1"], "expected SECTION.KEY=VALUE"),
        (["--preset", "tiyn", "--data", "{data}"], "did you mean 'tiny'"),
        ([], "no training data"),
    ],
)
def test_bad_train_inputs_are_one_line_errors(
    flowroll_data: Path, tmp_path: Path, capsys, args, match
):
    (tmp_path / "empty").mkdir()
    fill = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "data": flowroll_data}
    argv = ["train", *(a.format(**fill) for a in args), f"logging.runs_dir={tmp_path / 'runs'}"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_eval_and_generate_from_a_run(flowroll_data: Path, tmp_path: Path, capsys):
    result = train(
        tiny_config(flowroll_data, tmp_path / "runs", "train.max_steps=4"), log=lambda *a, **k: None
    )
    capsys.readouterr()
    assert cli(["eval", str(result.run_dir), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["val_loss"] > 0 and out["val_tokens"] > 0 and "val_bits_per_byte" in out
    argv = [
        "generate",
        str(result.run_dir),
        "--prompt",
        "[1 2] | sort =>",
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    assert cli(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("[1 2] | sort =>")
    assert cli(argv) == 0
    assert capsys.readouterr().out == first  # seeded sampling repeats
    assert cli(["eval", str(tmp_path / "nothing")]) == 2


def test_loader_cursor_resumes_exactly_and_ranks_are_disjoint(flowroll_data: Path):
    split = open_split(flowroll_data, "train")
    a = TokenLoader(split, 4, 16, seed=5)
    batches = [a.next_batch()[0] for _ in range(a.batches_per_epoch + 3)]  # crosses an epoch
    b = TokenLoader(split, 4, 16, seed=5)
    for _ in range(7):
        b.next_batch()
    c = TokenLoader(split, 4, 16, seed=5)
    c.load_state_dict(b.state_dict())
    for expected in batches[7:]:
        assert torch.equal(c.next_batch()[0], expected)
    r0, r1 = (TokenLoader(split, 2, 16, seed=5, rank=r, world_size=2) for r in (0, 1))
    w0, w1 = r0.next_windows(), r1.next_windows()
    assert not set(w0) & set(w1)
    assert sorted([*w0, *w1]) == sorted(TokenLoader(split, 4, 16, seed=5).next_windows())
    x, y = a.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_schedule_shape():
    cfg = build_config(
        "tiny",
        overrides=[
            "train.lr=1.0",
            "train.warmup_steps=10",
            "train.max_steps=110",
            "train.min_lr_ratio=0.1",
        ],
    ).train
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(np.diff(lrs[10:]) <= 1e-12)


def test_weight_decay_only_on_matrices():
    from lmlab.model.build import build_model

    model = build_model(build_config("ultra-tiny").model)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.tok_emb.weight for p in no_decay["params"])
    assert any(p is model.lm_head.weight for p in decay["params"])  # untied LLaMA head decays
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()


def test_tensorboard_events_are_written(flowroll_data: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    result = train(
        tiny_config(
            flowroll_data, tmp_path / "runs", "train.max_steps=2", "logging.tensorboard=true"
        ),
        log=lambda *a, **k: None,
    )
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_the_compile_cache_lives_in_the_users_cache_folder(tmp_path: Path, monkeypatch):
    from lmlab.train.distributed.parallelize import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "lmlab" / "torch-compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache_dir() == tmp_path / "home" / ".cache" / "lmlab" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"  # the user's own choice wins


@pytest.mark.slow
def test_compiled_training_matches_eager(flowroll_data: Path, tmp_path: Path, monkeypatch):
    """The compiled blocks train as the eager ones do, and what was compiled is kept in the
    persistent cache folder for the next run."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    common = ("train.max_steps=4", "model.dropout=0.0", "eval.interval=0", "checkpoint.interval=0")
    eager = train(tiny_config(flowroll_data, tmp_path / "a", *common), log=lambda *a, **k: None)
    compiled = train(
        tiny_config(flowroll_data, tmp_path / "b", *common, "train.compile=true"),
        log=lambda *a, **k: None,
    )
    for (step_a, loss_a), (step_b, loss_b) in zip(
        losses(eager.run_dir), losses(compiled.run_dir), strict=True
    ):
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-4)
    cache = tmp_path / "xdg" / "lmlab" / "torch-compile"
    assert any(f.is_file() for f in cache.rglob("*")), "nothing compiled was cached"


def test_cli_stop_and_resume_latest(flowroll_data: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/ in the working directory, where `latest` looks
    args = [
        "--preset",
        "ultra-tiny",
        "--data",
        str(flowroll_data),
        "--device",
        "cpu",
        "model.context_length=32",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "eval.interval=0",
        "logging.tensorboard=false",
    ]
    assert cli(["train", *args, "--stop-at-step", "3"]) == 0
    assert "Continue with: lmlab train --resume" in capsys.readouterr().out
    assert cli(["train", "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert "from step_00000003" in out and "step 6/6" in out
    run = next(Path("runs/ultra-tiny").iterdir())
    assert [c.name for c in list_checkpoints(run)][-1] == "step_00000006"


def test_latest_run_skips_runs_without_a_checkpoint(tmp_path: Path, monkeypatch, capsys):
    from lmlab.runs.folder import latest_run

    saved = tmp_path / "runs" / "tiny" / "20261123-100000"
    (saved / "checkpoints" / "step_00000005").mkdir(parents=True)
    (saved / "checkpoints" / "step_00000005" / "meta.json").write_text("{}")
    (saved / "config.yaml").write_text("")
    newer = tmp_path / "runs" / "tiny" / "20261123-110000"  # died before its first save
    newer.mkdir()
    (newer / "config.yaml").write_text("")
    os.utime(saved / "config.yaml", (1, 1))
    assert latest_run(tmp_path / "runs") == saved
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "--resume", "latest", "logging.runs_dir=elsewhere"]) == 2
    assert "no runs with a checkpoint found under elsewhere" in capsys.readouterr().err
