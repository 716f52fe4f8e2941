"""lmlab compare: paired differences of two prediction sets, disagreeing examples, the
JSON and Markdown reports, and (slow) the whole command on two trained runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmlab.errors import UserError
from lmlab.eval.compare import compare_predictions, to_markdown
from lmlab.eval.score import score_records


def records(predictions: list[str]) -> list[dict]:
    references = ["red", "green", "blue", "cyan", "pink", "gold"]
    return [
        {"prompt": f"colour {i}?", "reference": ref, "prediction": pred}
        for i, (ref, pred) in enumerate(zip(references, predictions, strict=True))
    ]


BEFORE = records(["red", "grey", "blue", "black", "pink", "white"])
AFTER = records(["red", "green", "blue", "cyan", "pink", "silver"])


def test_differences_are_b_minus_a_with_a_paired_interval():
    report = compare_predictions(BEFORE, AFTER, names=("base", "tuned"), metrics="exact_match")
    exact = report.differences["exact_match"]
    # Hand-checked: A gets 3 of 6 right, B 5 of 6; B never loses a record A had.
    assert report.a.aggregates["exact_match"].value == pytest.approx(3 / 6)
    assert report.b.aggregates["exact_match"].value == pytest.approx(5 / 6)
    assert exact.value == pytest.approx(2 / 6)
    # Every per-record difference is 0 or +1, so every paired resample is >= 0 and the
    # interval cannot reach below zero. Unpaired resampling of A and B would.
    assert exact.ci_low is not None and exact.ci_high is not None
    assert 0 <= exact.ci_low <= exact.value <= exact.ci_high <= 4 / 6 + 1e-12
    # The paired interval is the percentile interval of the resampled B - A.
    a = score_records(BEFORE, "exact_match", seed=0)
    b = score_records(AFTER, "exact_match", seed=0)
    diff = b.resamples["exact_match"] - a.resamples["exact_match"]
    assert exact.ci_low == pytest.approx(np.percentile(diff, 2.5))
    assert exact.ci_high == pytest.approx(np.percentile(diff, 97.5))


def test_disagreements_are_the_records_scored_differently():
    report = compare_predictions(BEFORE, AFTER, metrics=["exact_match", "token_f1"], examples=5)
    assert report.primary == "exact_match"
    assert [d["index"] for d in report.disagreements] == [1, 3]
    first = report.disagreements[0]
    assert first == {
        "index": 1,
        "prompt": "colour 1?",
        "reference": "green",
        "a": "grey",
        "b": "green",
        "score_a": 0.0,
        "score_b": 1.0,
    }
    assert len(compare_predictions(BEFORE, AFTER, examples=1).disagreements) == 1


def test_json_and_markdown_reports():
    report = compare_predictions(BEFORE, AFTER, names=("base", "tuned"), metrics="exact_match,chrf")
    data = json.loads(json.dumps(report.to_json()))
    assert data["a"] == "base" and data["b"] == "tuned" and data["records"] == 6
    em = data["metrics"]["exact_match"]
    assert em["b_minus_a"]["value"] == pytest.approx(em["b"]["value"] - em["a"]["value"])
    assert data["metrics"]["chrf"]["scale"] == "0-100"
    markdown = to_markdown(report)
    assert "| exact_match | 0.5000 | 0.8333 | +0.3333 |" in markdown
    assert "record 2: prompt `colour 1?`, reference `green`" in markdown


@pytest.mark.parametrize(
    "b, message",
    [
        (AFTER[:5], "differ in length"),
        ([{**r, "reference": "x"} if i == 2 else r for i, r in enumerate(AFTER)], "record 3"),
    ],
)
def test_different_tasks_are_refused(b, message):
    with pytest.raises(UserError, match=message):
        compare_predictions(BEFORE, b)


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="unknown metric"):
        compare_predictions(BEFORE, AFTER, metrics="accuracy")
    with pytest.raises(UserError, match="--examples"):
        compare_predictions(BEFORE, AFTER, examples=-1)


@pytest.mark.slow
def test_compare_command_before_and_after_more_training(
    flowroll_data: Path, tmp_path: Path, capsys
):
    from lmlab.commands.compare import main
    from lmlab.config import build_config
    from lmlab.train.loop import train

    def tiny_run(steps: int) -> Path:
        cfg = build_config(
            "ultra-tiny",
            overrides=[
                f"data.path={flowroll_data}",
                f"logging.runs_dir={tmp_path / f'runs{steps}'}",
                "model.context_length=64",
                "train.micro_batch_size=8",
                f"train.max_steps={steps}",
                "train.lr=3e-3",
                "train.warmup_steps=2",
                "train.device=cpu",
                "eval.interval=0",
                "logging.tensorboard=false",
            ],
        )
        return train(cfg, log=lambda *a, **k: None).run_dir

    before, after = tiny_run(2), tiny_run(40)
    task = ["--task", "dsl:flowroll:10", "--max-new-tokens", "16", "--bootstrap", "200"]
    save = tmp_path / "saved"
    args = [str(before), str(after), *task, "--json", "--save-predictions", str(save)]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["records"] == 10 and data["primary_metric"] == "execution_accuracy"
    for name, metric in data["metrics"].items():
        assert metric["b_minus_a"]["value"] == pytest.approx(
            metric["b"]["value"] - metric["a"]["value"]
        ), name
    assert sorted(p.name for p in save.iterdir()) == ["a.jsonl", "b.jsonl", "compare.json"]
    a = [json.loads(line) for line in (save / "a.jsonl").read_text().splitlines()]
    assert len(a) == 10 and all("prediction" in r for r in a)
    assert json.loads((save / "compare.json").read_text()) == data
    # The table and the Markdown forms run too; an existing save folder is refused.
    assert main([str(before), str(after), *task, "--markdown"]) == 0
    assert "| execution_accuracy |" in capsys.readouterr().out
    with pytest.raises(UserError, match="not an empty folder"):
        main([str(before), str(after), *task, "--save-predictions", str(save)])
