"""lmlab finetune end to end: LoRA and full SFT, exact resume, HF bases, DPO, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.cli import main as cli_main
from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.finetune.dpo import dpo_loss
from lmlab.finetune.task import finetune
from lmlab.model.lora import base_state_dict
from lmlab.runs.checkpoint import list_checkpoints
from lmlab.runs.load import build_from_checkpoint
from lmlab.runs.status import run_status


def quiet(*args, **kwargs) -> None:
    pass


def finetune_config(base: Path, data: str | Path, runs: Path, method: str, *extra: str):
    """A short fine-tune: LoRA / full, sft / dpo."""
    recipe = {"full": "finetune-full", "lora": "finetune-lora"}[method]
    return build_config(
        recipe,
        overrides=[
            f"finetune.base={base}",
            f"finetune.data={data}",
            f"logging.runs_dir={runs}",
            "finetune.epochs=0",
            "train.max_steps=8",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "eval.interval=4",
            "eval.batches=2",
            "checkpoint.interval=4",
            "logging.interval=1",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run)[-1] / "adapter.safetensors"))


def test_lora_run_resumes_bit_identically_and_keeps_the_base(base_run, sft_file, tmp_path):
    cfg = finetune_config(
        base_run, sft_file, tmp_path / "runs", "lora", "finetune.lora_dropout=0.1"
    )
    straight = finetune(cfg, log=quiet)
    stopped = finetune(cfg, stop_at_step=4, log=quiet)
    assert stopped.interrupted and run_status(stopped.run_dir)[0] == "interrupted"
    resumed = finetune(cfg, resume=stopped.run_dir, log=quiet)
    assert resumed.state.step == 8 and run_status(resumed.run_dir)[0] == "finished"
    a, b = adapter(straight.run_dir), adapter(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)

    # The checkpoint holds adapters only; the base under them is bit-identical to the base run.
    ckpt = list_checkpoints(straight.run_dir)[-1]
    assert not (ckpt / "model.safetensors").exists()
    model, _, saved_cfg, _ = build_from_checkpoint(straight.run_dir)
    base = load_file(str(list_checkpoints(base_run)[-1] / "model.safetensors"))
    for name, tensor in base_state_dict(model).items():
        if name in base:
            assert torch.equal(tensor, base[name]), name
    assert saved_cfg.finetune.base_sha256 and saved_cfg.finetune.method == "lora"


def test_full_finetune_changes_weights_and_resumes(base_run, sft_file, tmp_path):
    cfg = finetune_config(
        base_run, sft_file, tmp_path / "runs", "full", "train.lr=1e-3", "finetune.val_fraction=0.2"
    )
    straight = finetune(cfg, log=quiet)
    stopped = finetune(cfg, stop_at_step=3, log=quiet)
    resumed = finetune(cfg, resume=stopped.run_dir, log=quiet)
    a = load_file(str(list_checkpoints(straight.run_dir)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(resumed.run_dir)[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(list_checkpoints(base_run)[-1] / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in base)
    evals = [r for r in straight.history if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_completion_loss_falls_with_lora(base_run, tmp_path):
    cfg = finetune_config(
        base_run,
        "dsl:flowroll:400",
        tmp_path / "runs",
        "lora",
        "train.max_steps=40",
        "eval.interval=40",
    )
    result = finetune(cfg, log=quiet)
    evals = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.05, evals


@pytest.mark.slow
def test_finetune_a_local_hugging_face_folder(tmp_path, sft_file, capsys):
    """A tiny random transformers LLaMA saved with a tokenizer: fine-tune, eval, generate."""
    transformers = pytest.importorskip("transformers")
    from lmlab.data.tokenizer import train_bpe

    texts = [
        json.loads(line)["prompt"] + json.loads(line)["completion"]
        for line in sft_file.read_text().splitlines()
    ]
    tok = train_bpe(texts * 5, vocab_size=300)
    folder = tmp_path / "hf"
    hf_cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(folder, safe_serialization=True)
    tok.save(folder)
    runs = tmp_path / "runs"
    rc = cli_main_rc(
        [
            "finetune",
            "--from",
            str(folder),
            "--data",
            str(sft_file),
            "--method",
            "lora",
            f"logging.runs_dir={runs}",
            "train.max_steps=6",
            "train.device=cpu",
            "train.micro_batch_size=4",
            "logging.tensorboard=false",
        ]
    )
    assert rc == 0
    (run,) = (runs / "finetune-lora").iterdir()
    assert run_status(run)[0] == "finished"
    assert (
        cli_main_rc(
            [
                "generate",
                str(run),
                "--prompt",
                "[1 2] | sort =>",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )


def cli_main_rc(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return info.value.code


def test_dpo_loss_is_ln2_at_the_start_and_matches_a_hand_computation():
    zero = torch.zeros(3)
    loss, stats = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.5]), torch.tensor([-2.0, -1.5])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margins: 0.5*((-1+1.5)-(-3+2)) = 0.75 ; 0.5*((-2+2.5)-(-1+1.5)) = 0.0
    expected = (-math.log(1 / (1 + math.exp(-0.75))) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["preference_accuracy"].item() == 0.5


def preference_file(path: Path, n: int = 48) -> Path:
    rows = [
        {
            "prompt": f"[{i % 9} {(i + 3) % 9}] | sort =>",
            "chosen": f" [{min(i % 9, (i + 3) % 9)} {max(i % 9, (i + 3) % 9)}]",
            "rejected": " [9 9 9 9]",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_ln2_and_learns_the_preference(method, base_run, tmp_path):
    data = preference_file(tmp_path / "prefs.jsonl")
    lr = "train.lr=5e-3" if method == "lora" else "train.lr=1e-3"
    cfg = finetune_config(
        base_run,
        data,
        tmp_path / "runs",
        method,
        "finetune.objective=dpo",
        "model.dropout=0.0",
        "train.max_steps=30",
        "eval.interval=30",
        "logging.interval=5",
        "finetune.val_fraction=0.25",
        "train.warmup_steps=2",
        lr,
    )
    result = finetune(cfg, log=quiet)
    evals = [r for r in result.history if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[-1]["val_preference_accuracy"] > 0.9, evals[-1]
    logged = [r for r in result.history if "reward_margin" in r]
    assert logged and logged[-1]["reward_margin"] > 0


BAD_FLAGS = [
    (["--data", "x.jsonl"], "required"),
    (["--from", "{base}", "--data", "{missing}"], "No such file"),
    (["--from", "{tmp}", "--data", "{sft}"], "is not a model"),
    (["--from", "{base}", "--data", "{sft}", "finetune.lora_rank=0"], "rank must be"),
    (["--from", "{base}", "--data", "{sft}", "finetune.lora_targets=c_attn"], "not a module"),
    (["--from", "{base}", "--data", "{sft}", "finetune.lora_dropout=1.5"], "dropout"),
    (
        ["--from", "{base}", "--data", "{sft}", "--method", "full", "--adapter", "{tmp}"],
        "LoRA adapter",
    ),
    (["--from", "{base}", "--data", "{sft}", "finetune.method=wrong"], "must be one of"),
    (["--from", "{base}", "--data", "{sft}", "train.seq_len=4096"], "longer than"),
    (
        ["--from", "{base}", "--data", "{sft}", "train.micro_batch_size=1000"],
        "fewer than one batch",
    ),
    (["--from", "{base}", "--data", "{sft}", "--preset", "tiny"], "not a fine-tuning recipe"),
    (["--from", "nobody/no-such-model-xyz", "--data", "{sft}"], "offline"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS)
def test_bad_finetune_inputs_are_one_line_errors(
    argv, message, base_run, sft_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    fill = {"base": base_run, "missing": tmp_path / "nope.jsonl", "tmp": tmp_path, "sft": sft_file}
    argv = [a.format(**fill) for a in argv]
    with pytest.raises(SystemExit) as info:
        cli_main(["finetune", *argv, f"logging.runs_dir={runs}", "train.device=cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # One line says what is wrong (argparse's own errors come after its usage lines).
    assert message in err[-1] and err[-1].startswith("lmlab finetune: error:"), err
    assert "Traceback" not in "\n".join(err)
    assert not runs.exists() or not any(runs.rglob("config.yaml"))  # nothing half-written


def test_resume_against_another_base_is_refused(base_run, sft_file, tmp_path):
    cfg = finetune_config(base_run, sft_file, tmp_path / "runs", "lora")
    run = finetune(cfg, stop_at_step=2, log=quiet).run_dir
    other = tmp_path / "other_base"
    other.mkdir()
    ckpt = list_checkpoints(base_run)[-1]
    for f in ckpt.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(other / "model.safetensors"))
    weights["tok_emb.weight"] += 1.0
    from safetensors.torch import save_file

    save_file(weights, str(other / "model.safetensors"))
    meta = json.loads((other / "meta.json").read_text())
    del meta["files"]  # another model, not a corrupted copy of this one
    (other / "meta.json").write_text(json.dumps(meta))
    from lmlab.config import load_config, merge, parse_override

    saved = merge(load_config(run / "config.yaml"), parse_override(f"finetune.base={other}"))
    with pytest.raises(UserError, match="not this run's base model"):
        finetune(saved, resume=run, log=quiet)
    with pytest.raises(UserError, match="not this run's base model"):
        build_from_checkpoint(_with_base(run, other))


def _with_base(run: Path, base: Path) -> Path:
    """A copy of the run's newest checkpoint whose config points at another base."""
    import shutil

    from lmlab.config import load_config, merge, parse_override, save_config

    ckpt = list_checkpoints(run)[-1]
    copy = run.parent / "copied_ckpt"
    shutil.copytree(ckpt, copy)
    save_config(
        merge(load_config(copy / "config.yaml"), parse_override(f"finetune.base={base}")),
        copy / "config.yaml",
    )
    from lmlab.runs.checkpoint import record_hashes

    record_hashes(copy)  # edited on purpose
    return copy


def test_merge_equals_base_plus_adapter(base_run, sft_file, tmp_path, capsys):
    cfg = finetune_config(base_run, sft_file, tmp_path / "runs", "lora", "train.lr=1e-2")
    run = finetune(cfg, log=quiet).run_dir
    out = tmp_path / "merged"
    assert cli_main_rc(["lora", "merge", str(run), "--out", str(out)]) == 0
    lora_model, tok, _, _ = build_from_checkpoint(run)
    merged, tok2, merged_cfg, _ = build_from_checkpoint(out)
    assert merged_cfg.finetune.method == "full" and tok.to_json() == tok2.to_json()
    ids = torch.randint(
        0, merged_cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (lora_model(ids)[0] - merged(ids)[0]).abs().max().item()
    assert diff < 1e-5, diff
    # A merged model is a full model: it can be fine-tuned again; a LoRA run cannot be a base.
    assert cli_main_rc(["lora", "merge", str(run), "--out", str(out)]) == 2  # exists
    assert cli_main_rc(["lora", "merge", str(out), "--out", str(tmp_path / "again")]) == 2
    with pytest.raises(UserError, match="lora merge"):
        finetune(finetune_config(run, sft_file, tmp_path / "runs2", "lora"), log=quiet)


def test_qlora_run_resumes_exactly_and_loads_quantized(base_run, sft_file, tmp_path):
    from lmlab.model.lora import lora_modules
    from lmlab.model.quant import NF4Linear

    cfg = finetune_config(
        base_run, sft_file, tmp_path / "runs", "lora", "finetune.method=qlora", "train.lr=1e-2"
    )
    straight = finetune(cfg, log=quiet)
    stopped = finetune(cfg, stop_at_step=4, log=quiet)
    resumed = finetune(cfg, resume=stopped.run_dir, log=quiet)
    a, b = adapter(straight.run_dir), adapter(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, _, saved, _ = build_from_checkpoint(straight.run_dir)
    assert saved.finetune.method == "qlora"
    assert all(isinstance(m.base, NF4Linear) for m in lora_modules(model).values())
    # Merge and export use the full-precision base under the adapters.
    out = tmp_path / "merged"
    assert cli_main_rc(["lora", "merge", str(straight.run_dir), "--out", str(out)]) == 0
    merged, _, _, _ = build_from_checkpoint(out)
    unquantized, _, _, _ = build_from_checkpoint(straight.run_dir, quantized=False)
    ids = torch.randint(
        0, saved.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert (merged(ids)[0] - unquantized(ids)[0]).abs().max().item() < 1e-5
        # NF4 changes the base a little, not a lot.
        gap = (model(ids)[0] - unquantized(ids)[0]).abs().max().item()
    assert 0 < gap < 1.0
