"""lmlab export --format hf: transformers loads the folder unchanged, with lmlab's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.cli import main as cli_main
from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.export.hf import export_hf
from lmlab.runs.load import build_from_checkpoint
from lmlab.train.loop import train

transformers = pytest.importorskip("transformers")


def trained_run(data: Path, runs: Path, family: str) -> Path:
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            f"model.family={family}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.max_steps=3",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=lambda *a, **k: None).run_dir


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return info.value.code


@pytest.mark.parametrize("family", ["gpt2", "llama", "moe"])
def test_transformers_loads_the_export_with_our_logits_and_stops(
    family, flowroll_data, tmp_path, capsys
):
    run = trained_run(flowroll_data, tmp_path / "runs", family)
    out = tmp_path / "hf"
    assert run_cli(["export", str(run), "--out", str(out)]) == 0
    assert "max logit difference" in capsys.readouterr().out
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name

    ours, tokenizer, cfg, _ = build_from_checkpoint(run)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    expected_class = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
    assert type(model).__name__ == expected_class.get(family, "MixtralForCausalLM")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "[3 1 2] | sort =>"
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode(text)  # same ids, no added specials
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ours(ids)[0]).abs().max().item() < 1e-5
    assert model.config.eos_token_id == tokenizer.eot_id == hf_tok.eos_token_id
    assert hf_tok.model_max_length == cfg.model.context_length

    # generate() stops at the end-of-document token: the generation config says which.
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == tokenizer.eot_id
    assert generation.pad_token_id in (tokenizer.pad_id, tokenizer.eot_id)


def test_export_refuses_in_one_line_and_writes_nothing(flowroll_data, tmp_path):
    run = trained_run(flowroll_data, tmp_path / "runs", "llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_hf(run, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="dtype"):
        export_hf(run, tmp_path / "x", dtype="int3")
    with pytest.raises(UserError, match="does not exist"):
        export_hf(tmp_path / "nope", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    result = export_hf(run, tmp_path / "bf16", dtype="bf16")
    assert result["max_logit_difference"] < 0.1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exported_generation_is_our_greedy_generation_and_stops_at_end_of_text(
    family, flowroll_data, tmp_path
):
    from lmlab.generate.predict import read_inputs
    from lmlab.generate.sampling import generate

    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path / 'runs'}",
            f"model.family={family}",
            "model.context_length=64",
            "train.micro_batch_size=8",
            "train.max_steps=150",
            "train.lr=3e-3",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    run = train(cfg, log=lambda *a, **k: None).run_dir
    export_hf(run, tmp_path / "hf")
    ours, tokenizer, _, _ = build_from_checkpoint(run)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    eot, budget, stopped = tokenizer.eot_id, 30, 0
    for record in read_inputs("dsl:flowroll:6"):
        ids = tokenizer.encode(record["prompt"])
        expected = list(generate(ours, torch.tensor([ids]), budget, 0.0, stop_token_ids=[eot]))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=budget, do_sample=False)
        assert out[0, len(ids) :].tolist() == expected, record["prompt"]
        if expected[-1] == eot:  # transformers stopped there too, by the exported config
            stopped += 1
            assert len(expected) < budget
            text = transformers.pipeline("text-generation", model=model, tokenizer=hf_tok)(
                record["prompt"], max_new_tokens=budget, do_sample=False
            )[0]["generated_text"]
            assert text == record["prompt"] + tokenizer.decode(expected[:-1])
    assert stopped >= 3  # the check above ran
