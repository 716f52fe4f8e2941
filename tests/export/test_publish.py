"""lmlab publish: the folder a dry run writes (weights, card, loss curve), the card's facts
against the run's files, the token never written, and the upload against a stand-in HfApi."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=lambda *a, **k: None).run_dir


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def all_bytes(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file())


def test_dry_run_writes_the_folder_and_a_card_of_the_runs_facts(run, tmp_path, monkeypatch):
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
    [results] = meta["model-index"][0]["results"]
    assert results["metrics"][0] == {
        "type": "loss",
        "name": "validation loss",
        "value": round(val_loss, 4),
    }
    assert {"type": "exact_match", "name": "exact_match (p.jsonl)", "value": 0.25} in results[
        "metrics"
    ]
    assert (
        f"{val_loss:.4f}" in card
        and "| p.jsonl | exact_match | 0.2500 | [0.1000, 0.4000] |" in card
    )
    assert 'pipeline("text-generation", model="alice/tiny-flowroll")' in card
    assert "- steps: 20" in card
    # The token is in the environment, and nowhere on disk.
    assert FAKE_TOKEN.encode() not in all_bytes(out, run)
    # The folder loads in transformers as it would from the Hub.
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(str(out))


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
