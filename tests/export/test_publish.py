"""lmlab publish: the folder a dry run writes (weights, card, loss curve), the card's facts
against the run's files, the token never written, and the upload against a stand-in HfApi."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.export.publish import check_repo_id, publish
from lmlab.runs.metrics import read_metrics
from lmlab.train.loop import train

pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

FAKE_TOKEN = "hf_lmlabTestTokenThatMustNeverBeWritten0123"


@pytest.fixture(scope="module")
def run(flowroll_data: Path, tmp_path_factory) -> Path:
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path_factory.mktemp('runs')}",
            "model.context_length=32",
            "train.max_steps=20",
            "train.device=cpu",
            "eval.interval=10",
            "eval.batches=2",
            "checkpoint.interval=10",
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=lambda *a, **k: None).run_dir


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def all_bytes(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file())


def run_usage(card: str, repo_id: str, folder: Path, capsys) -> str:
    """Run the card's "How to use" code against the local folder; returns what it printed."""
    code = card.split("## How to use\n\n```python\n")[1].split("```")[0]
    capsys.readouterr()
    exec(code.replace(f'"{repo_id}"', repr(str(folder))), {})
    return capsys.readouterr().out


def test_dry_run_writes_the_folder_and_a_card_of_the_runs_facts(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    score = tmp_path / "scores.json"
    metrics = {"exact_match": {"value": 0.25, "ci_low": 0.1, "ci_high": 0.4, "n": 8}}
    score.write_text(
        json.dumps({"format": "lmlab-score", "predictions": "p.jsonl", "metrics": metrics})
    )
    out = tmp_path / "publish"
    result = publish(
        run, "alice/tiny-flowroll", out=out, dry_run=True, license="mit", evaluations=[score]
    )
    assert result["uploaded"] is False
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "loss_curve.png",
    ):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert "lmlab" in meta["tags"] and "base_model" not in meta
    val_loss = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    held_out, scored = meta["model-index"][0]["results"]
    assert held_out["metrics"][0] == {
        "type": "loss",
        "name": "validation loss",
        "value": round(val_loss, 4),
    }
    # conftest's flowroll_data is prepared from dsl:flowroll:3000
    assert held_out["dataset"] == {
        "type": "dsl:flowroll:3000",
        "name": "held-out split of dsl:flowroll:3000",
    }
    assert scored["dataset"] == {"type": "p.jsonl", "name": "p.jsonl"}
    assert scored["metrics"] == [{"type": "exact_match", "name": "exact_match", "value": 0.25}]
    assert (
        f"{val_loss:.4f}" in card
        and "| p.jsonl | exact_match | 0.2500 | [0.1000, 0.4000] |" in card
    )
    assert 'pipeline("text-generation", model="alice/tiny-flowroll")' in card
    assert "- steps: 20" in card
    # The token is in the environment, and nowhere on disk.
    assert FAKE_TOKEN.encode() not in all_bytes(out, run)
    # The folder loads in transformers as it would from the Hub, with as many parameters
    # as the card says.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert f"A {sum(p.numel() for p in model.parameters()):,}-parameter LLaMA" in card
    # huggingface_hub reads the metadata as the Hub does (it refuses a malformed model-index).
    from huggingface_hub import ModelCard

    evals = ModelCard(card).data.eval_results
    assert [(e.metric_type, e.metric_value) for e in evals] == [
        ("loss", round(val_loss, 4)),
        ("perplexity", round(math.exp(val_loss), 2)),
        ("exact_match", 0.25),
    ]
    assert evals[2].dataset_name == "p.jsonl"
    assert run_usage(card, "alice/tiny-flowroll", out, capsys).startswith("Hello")


def test_an_older_checkpoint_gets_its_own_history(run, tmp_path):
    from lmlab.runs.checkpoint import list_checkpoints

    first = list_checkpoints(run)[0]
    step = json.loads((first / "meta.json").read_text())["step"]
    assert step < 20  # the run went on after it
    publish(first, "alice/tiny", out=tmp_path / "publish", dry_run=True)
    card = (tmp_path / "publish" / "README.md").read_text()
    val_loss = [r["val_loss"] for r in read_metrics(run) if r["step"] == step and "val_loss" in r][
        -1
    ]
    assert f"- steps: {step}" in card
    assert front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["value"] == round(
        val_loss, 4
    )


def test_without_matplotlib_the_card_says_there_is_no_plot(run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    result = publish(run, "alice/tiny", out=tmp_path / "publish", dry_run=True)
    assert "loss_curve.png" not in result["files"] and "model.safetensors" in result["files"]
    card = (tmp_path / "publish" / "README.md").read_text()
    assert "(No loss curve: matplotlib is not installed" in card and "loss_curve.png" not in card


def test_hub_base_and_datasets_are_metadata_and_local_paths_stay_private(run, tmp_path):
    """A Hub base model and hf:OWNER/NAME data become base_model / datasets; local paths
    (hf: may name a local file too) appear as their last component only."""
    from lmlab.config import load_config
    from lmlab.export.card import facts_from_run, model_card
    from lmlab.runs.checkpoint import list_checkpoints

    ckpt = list_checkpoints(run)[-1]
    cfg = load_config(run / "config.yaml")
    data = tmp_path / "secret-folder" / "prepared"
    data.mkdir(parents=True)
    inputs = ["hf:alice/stories", f"hf:{tmp_path}/secret-folder/notes.parquet", "dsl:flowroll"]
    (data / "manifest.json").write_text(json.dumps({"source": {"inputs": inputs}}))
    cfg.data.path = str(data)
    facts = facts_from_run(ckpt, run, cfg, parameters=1000)
    card = model_card(facts, "carol/tiny", "mit", has_curve=False)
    meta = front_matter(card)
    assert meta["datasets"] == ["alice/stories"] and "base_model" not in meta
    assert "`hf:alice/stories`, `hf:notes.parquet`, `dsl:flowroll`" in card
    assert "secret-folder" not in card and str(tmp_path) not in card

    cfg.finetune.base, cfg.finetune.method = "bob/base-model", "lora"
    cfg.finetune.data = f"{tmp_path}/secret-folder/chat.jsonl"
    card = model_card(facts_from_run(ckpt, run, cfg, parameters=1000), "carol/tiny", "mit", False)
    meta = front_matter(card)
    assert meta["base_model"] == "bob/base-model" and "datasets" not in meta
    assert "Fine-tuned (lora) from bob/base-model." in card and "`chat.jsonl`" in card
    assert "secret-folder" not in card


def test_an_exported_folder_is_published_as_is(run, tmp_path):
    from lmlab.export.hf import export_hf

    export_hf(run, tmp_path / "hf")
    out = tmp_path / "publish"
    result = publish(tmp_path / "hf", "alice/tiny", out=out, dry_run=True)
    assert "model.safetensors" in result["files"] and "README.md" in result["files"]
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "hf" / "model.safetensors"
    ).read_bytes()
    card = (out / "README.md").read_text()
    assert front_matter(card)["license"] == "other"
    assert "Unknown: this card was written for an exported folder" in card


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what an upload would send."""

    calls: list = []

    def __init__(self, token=None):
        RecordingApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))


def test_upload_sends_the_folder_with_the_token_from_the_environment(run, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    out = tmp_path / "publish"
    result = publish(run, "alice/tiny", out=out, private=True)
    assert result["uploaded"] and result["url"] == "https://huggingface.co/alice/tiny"
    init, create, upload = RecordingApi.calls
    assert init == ("init", FAKE_TOKEN)
    assert create == (
        "create_repo",
        "alice/tiny",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert upload[1]["folder_path"] == str(out) and upload[1]["repo_id"] == "alice/tiny"
    assert FAKE_TOKEN.encode() not in all_bytes(out, run)


def test_an_unreachable_hub_is_one_line_and_keeps_the_folder(run, tmp_path, monkeypatch):
    import huggingface_hub

    class Unreachable(RecordingApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    with pytest.raises(UserError) as error:
        publish(run, "alice/tiny", out=tmp_path / "publish")
    assert "\n" not in str(error.value) and "Failed to resolve" in str(error.value)
    assert (tmp_path / "publish" / "model.safetensors").is_file()


def test_no_token_is_refused_before_any_work(run, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="no Hugging Face token"):
        publish(run, "alice/tiny", out=tmp_path / "publish")
    assert not (tmp_path / "publish").exists()


def test_offline_writes_the_folder_and_uploads_nothing(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set: nothing uploaded"):
        publish(run, "alice/tiny", out=tmp_path / "publish")
    assert (tmp_path / "publish" / "README.md").is_file()


@pytest.mark.parametrize(
    "repo",
    [
        "tiny",
        "alice/",
        "/tiny",
        "alice/tiny/extra",
        "alice/ti ny",
        "-alice/tiny",
        "alice/tiny.",
        "alice/a..b",
    ],
)
def test_bad_repo_ids_are_refused(repo):
    with pytest.raises(UserError, match="not a Hub repo id"):
        check_repo_id(repo)


def test_bad_inputs_write_nothing(run, tmp_path, monkeypatch):
    from lmlab.commands.publish import main

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    out = tmp_path / "publish"
    with pytest.raises(UserError, match="does not exist"):
        main([str(tmp_path / "missing"), "--repo", "alice/tiny", "--dry-run", "--out", str(out)])
    with pytest.raises(UserError, match="--eval .* does not exist"):
        main(
            [
                str(run),
                "--repo",
                "alice/tiny",
                "--dry-run",
                "--out",
                str(out),
                "--eval",
                "nope.json",
            ]
        )
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="is not a report"):
        main(
            [
                str(run),
                "--repo",
                "alice/tiny",
                "--dry-run",
                "--out",
                str(out),
                "--eval",
                str(tmp_path / "other.json"),
            ]
        )
    assert not out.exists()
    assert main([str(run), "--repo", "alice/tiny", "--dry-run", "--out", str(out)]) == 0
    with pytest.raises(UserError, match="exists"):
        main([str(run), "--repo", "alice/tiny", "--dry-run", "--out", str(out)])
    assert (
        main([str(run), "--repo", "alice/tiny", "--dry-run", "--out", str(out), "--overwrite"]) == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_lora_run_is_published_merged_with_its_chat_template(run, tmp_path, capsys):
    import transformers

    from lmlab.finetune.task import finetune
    from lmlab.runs.load import load_model

    rows = [{"prompt": f"[{i}] | sum =>", "completion": f" {i}"} for i in range(16)]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config(
        "finetune-lora",
        overrides=[
            f"finetune.base={run}",
            f"finetune.data={sft}",
            f"logging.runs_dir={tmp_path / 'runs'}",
            "finetune.epochs=0",
            "train.max_steps=3",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "eval.interval=3",
            "eval.batches=1",
            "logging.tensorboard=false",
        ],
    )
    lora_run = finetune(cfg, log=lambda *a, **k: None).run_dir
    out = tmp_path / "publish"
    publish(lora_run, "alice/tiny-chat", out=out, dry_run=True)
    assert (out / "chat_template.jinja").is_file()
    card = (out / "README.md").read_text()
    assert f"Fine-tuned (lora) from a local model ({run.name})." in card
    assert "base_model" not in front_matter(card) and "- steps: 3" in card
    assert "tokenizer.apply_chat_template(" in card and 'reply.split("<|end|>")[0]' in card
    assert str(tmp_path) not in card
    assert "<|end|>" not in run_usage(card, "alice/tiny-chat", out, capsys)
    # The weights are base + adapters: the same logits as lmlab's LoRA model.
    ids = torch.randint(0, 20, (1, 12), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        expected = load_model(lora_run).model(ids)[0]
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
