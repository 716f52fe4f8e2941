"""`lmlab score` and `score_records`: hand-checked aggregates, execution accuracy through
the practice-language interpreters, the bootstrap, every bad input, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lmlab.commands.score import main
from lmlab.errors import UserError
from lmlab.eval.score import (
    METRICS,
    TEXT_METRICS,
    Predictions,
    read_predictions,
    score_records,
)

# Five records, one per way of giving a reference. Per record, by hand:
#                                        EM  normEM  F1                     Jaccard
# 1 strip only                            1   1       1                      1
# 2 "the", "." and case                   0   1       1                      1
# 3 [red red fruit] vs [red apple]        0   0       P 1/3 R 1/2 -> 0.4     {red} of 3 -> 1/3
# 4 two references, "Green" normalised    0   1       1                      1
# 5 [dark blue] vs assistant's [blue]     0   0       P 1/2 R 1 -> 2/3       1 of 2 -> 1/2
RECORDS = [
    {"prompt": "Q1", "reference": "The Eiffel Tower", "prediction": " The Eiffel Tower\n"},
    {"prompt": "Q2", "reference": "eiffel tower", "prediction": "The Eiffel tower."},
    {"prompt": "Q3", "answer": "a red apple", "prediction": "red red fruit"},
    {"prompt": "Q4", "reference": ["blue sky", "Green"], "prediction": "green"},
    {
        "messages": [
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "blue"},
        ],
        "prediction": "dark blue",
    },
]
EXPECTED = {
    "exact_match": [1, 0, 0, 0, 0],
    "normalized_exact_match": [1, 1, 0, 1, 0],
    "token_f1": [1, 1, 0.4, 1, 2 / 3],
    "jaccard": [1, 1, 1 / 3, 1, 1 / 2],
}
SIMPLE = list(EXPECTED)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def predictions_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "preds.jsonl", RECORDS)


def test_hand_checked_scores(predictions_file):
    report = score_records(read_predictions(predictions_file), metrics=SIMPLE, bootstrap=0)
    assert report.metrics == SIMPLE
    for name, per_record in EXPECTED.items():
        # means: EM 1/5, normEM 3/5, F1 (3 + 0.4 + 2/3)/5 = 0.8133, Jaccard (3 + 5/6)/5 = 0.7667
        assert report.aggregates[name].value == pytest.approx(np.mean(per_record))
        assert report.aggregates[name].n == 5
        assert report.aggregates[name].ci_low is None  # no resampling asked for
        assert [r[name] for r in report.records] == pytest.approx(per_record)
    assert report.aggregates["token_f1"].value == pytest.approx(0.81333, abs=1e-5)
    assert [r["index"] for r in report.records] == [0, 1, 2, 3, 4]


def test_library_metrics_and_defaults(predictions_file):
    import sacrebleu
    from rouge_score import rouge_scorer

    report = score_records(read_predictions(predictions_file), bootstrap=0)
    assert report.metrics == list(TEXT_METRICS)  # no "dsl" field: no execution_accuracy
    predictions = [r["prediction"] for r in RECORDS]
    references = [
        ["The Eiffel Tower"],
        ["eiffel tower"],
        ["a red apple"],
        ["blue sky", "Green"],
        ["blue"],
    ]
    for i, (p, refs) in enumerate(zip(predictions, references, strict=True)):
        assert report.records[i]["bleu"] == pytest.approx(sacrebleu.sentence_bleu(p, refs).score)
        assert report.records[i]["chrf"] == pytest.approx(sacrebleu.sentence_chrf(p, refs).score)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(2)]
    assert report.aggregates["bleu"].value == pytest.approx(
        sacrebleu.corpus_bleu(predictions, streams).score
    )
    assert report.aggregates["chrf"].value == pytest.approx(
        sacrebleu.corpus_chrf(predictions, streams).score
    )
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge_l = [
        max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
        for p, refs in zip(predictions, references, strict=True)
    ]
    assert report.aggregates["rougeL"].value == pytest.approx(np.mean(rouge_l))


def test_named_fields(tmp_path):
    records = [{"q": "x", "gold": "yes", "out": "Yes"}, {"q": "y", "gold": "no", "out": "no"}]
    report = score_records(
        records,
        metrics="exact_match,normalized_exact_match",
        reference_field="gold",
        prediction_field="out",
        bootstrap=0,
    )
    assert report.aggregates["exact_match"].value == 0.5
    assert report.aggregates["normalized_exact_match"].value == 1.0


def dsl_records() -> tuple[list[dict], list[str]]:
    """FLOWROLL records with right, wrong, run-on and unparsable predictions, and the
    `PROGRAM => PREDICTION` lines `lmlab dsl eval` would read for them."""
    from lmlab.data.dsl import format_prompt, generate_corpus, split_line

    records = []
    for i, line in enumerate(
        generate_corpus("flowroll", 8, seed=3, difficulty=(1, 2), split="test")
    ):
        program, result = split_line(line)
        prediction = [f" {result}", " [9 9 9]", f" {result}\n[1] | sort => [1]", f"{result}  "][
            i % 4
        ]
        records.append(
            {
                "prompt": format_prompt(program),
                "reference": result,
                "dsl": "flowroll",
                "prediction": prediction,
            }
        )
    records.append(
        {
            "prompt": "[1 2 | nope =>",
            "reference": "[1 2]",
            "dsl": "flowroll",
            "prediction": " [1 2]",
        }
    )
    lines = [f"{r['prompt']} {r['prediction'].strip()}" for r in records]
    return records, lines


def test_execution_accuracy_equals_the_interpreter():
    from lmlab.data.dsl.registry import evaluate

    records, lines = dsl_records()
    report = score_records(records, bootstrap=0)
    assert report.metrics == [*TEXT_METRICS, "execution_accuracy", "valid_fraction"]
    overall = evaluate("flowroll", lines)["overall"]
    assert report.aggregates["execution_accuracy"].value == pytest.approx(overall["exact_match"])
    assert report.aggregates["valid_fraction"].value == pytest.approx(overall["valid_fraction"])
    # right (0, 3, 4, 7) and the rest wrong; the unparsable program is the one invalid line
    assert [r["execution_accuracy"] for r in report.records] == [1, 0, 0, 1, 1, 0, 0, 1, 0]
    assert [r["valid_fraction"] for r in report.records] == [1] * 8 + [0]
    for record, line in zip(report.records, lines, strict=True):
        assert (
            record["execution_accuracy"] == evaluate("flowroll", [line])["overall"]["exact_match"]
        )


def test_bootstrap_is_deterministic_and_matches_a_plain_resample():
    import sacrebleu

    records, _ = dsl_records()
    records = records * 3  # 27 records
    metrics = ["exact_match", "token_f1", "bleu", "execution_accuracy"]
    a = score_records(records, metrics=metrics, bootstrap=200, seed=7)
    b = score_records(records, metrics=metrics, bootstrap=200, seed=7)
    c = score_records(records, metrics=metrics, bootstrap=200, seed=8)
    assert a.aggregates == b.aggregates
    assert a.aggregates != c.aggregates
    for score in a.aggregates.values():
        assert score.ci_low <= score.value <= score.ci_high
        assert score.ci_low < score.ci_high

    # The same intervals from a plain loop: draw indices, recompute on the resampled records.
    rng = np.random.default_rng(7)
    exact = np.array([r["exact_match"] for r in a.records])
    predictions = [r["prediction"] for r in records]
    references = [r["reference"] for r in records]
    means, bleus = [], []
    for _ in range(200):
        index = rng.integers(0, len(records), size=len(records))
        means.append(exact[index].mean())
        bleus.append(
            sacrebleu.corpus_bleu(
                [predictions[i] for i in index], [[references[i] for i in index]]
            ).score
        )
    assert (
        a.aggregates["exact_match"].ci_low,
        a.aggregates["exact_match"].ci_high,
    ) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert (a.aggregates["bleu"].ci_low, a.aggregates["bleu"].ci_high) == pytest.approx(
        tuple(np.percentile(bleus, [2.5, 97.5]))
    )


def test_works_without_the_eval_extra_when_its_metrics_are_not_asked(predictions_file, monkeypatch):
    for module in ("rouge_score", "rouge_score.rouge_scorer", "sacrebleu", "sacrebleu.metrics"):
        monkeypatch.setitem(sys.modules, module, None)
    report = score_records(read_predictions(predictions_file), metrics=SIMPLE, bootstrap=10)
    assert report.aggregates["exact_match"].value == pytest.approx(0.2)
    with pytest.raises(UserError, match=r"pip install 'lmlab\[eval\]'"):
        score_records(read_predictions(predictions_file), bootstrap=10)


BAD_FILES = {
    "not_json": ('{"reference": "a", "prediction": "a"}\n{oops\n', r"bad\.jsonl:2: not JSON"),
    "not_object": ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object, got list"),
    "no_prediction": (
        '\n{"reference": "a", "output_text": "a"}\n',
        r"bad\.jsonl:2: no prediction field 'prediction' \(the record has 'reference', 'output_text'\)",
    ),
    "no_reference": (
        '{"prompt": "p", "prediction": "a"}\n',
        r"bad\.jsonl:1: no reference: none of reference, .* \(the record has 'prompt', 'prediction'\)",
    ),
    "prediction_not_string": (
        '{"reference": "a", "prediction": 3}\n',
        r"bad\.jsonl:1: prediction 'prediction' must be a string, got int",
    ),
    "reference_not_string": (
        '{"reference": [], "prediction": "a"}\n',
        r"bad\.jsonl:1: reference 'reference' must be a string",
    ),
    "empty": ("\n\n", r"bad\.jsonl holds no records"),
    "no_dsl": (
        '{"prompt": "p =>", "reference": "a", "prediction": "a"}\n',
        r"bad\.jsonl:1: execution_accuracy needs practice-language records",
    ),
    "unknown_dsl": (
        '{"prompt": "p =>", "reference": "a", "dsl": "klingon", "prediction": "a"}\n',
        r"bad\.jsonl:1: unknown practice language 'klingon'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, case):
    text, message = BAD_FILES[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text, encoding="utf-8")
    metrics = ["execution_accuracy"] if case in ("no_dsl", "unknown_dsl") else ["exact_match"]
    out, records_out = tmp_path / "scores.json", tmp_path / "records.jsonl"
    argv = [
        "-p",
        str(bad),
        "--metrics",
        ",".join(metrics),
        "--out",
        str(out),
        "--records-out",
        str(records_out),
    ]
    with pytest.raises(UserError, match=message) as info:
        main(argv)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--metrics", "exact_match,bleurt"],
            r"unknown metric 'bleurt'; known metrics: exact_match, .*chrf, execution_accuracy",
        ),
        (["--bootstrap", "-1"], r"--bootstrap must be a number of resamples >= 0"),
        (
            ["--reference-field", "gold"],
            r"no reference field 'gold' \(the record has 'prompt', 'reference', 'prediction'\)",
        ),
    ],
)
def test_bad_options(predictions_file, tmp_path, argv, message):
    out = tmp_path / "scores.json"
    with pytest.raises(UserError, match=message):
        main(["-p", str(predictions_file), "--out", str(out), *argv])
    assert not out.exists()


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="predictions file not found"):
        main(["-p", str(tmp_path / "nope.jsonl")])


def test_cli_prints_a_table_and_writes_reports(predictions_file, tmp_path, capsys):
    out, records_out = tmp_path / "scores.json", tmp_path / "records.jsonl"
    argv = [
        "-p",
        str(predictions_file),
        "--metrics",
        ",".join(SIMPLE),
        "--bootstrap",
        "100",
        "--out",
        str(out),
        "--records-out",
        str(records_out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "95% CI" in table and "normalized_exact_match" in table and "0.6000" in table
    report = json.loads(out.read_text())
    assert report["format"] == "lmlab-score" and report["records"] == 5
    assert report["metrics"]["exact_match"]["value"] == pytest.approx(0.2)
    assert report["metrics"]["jaccard"]["ci_low"] <= report["metrics"]["jaccard"]["value"]
    rows = [json.loads(line) for line in records_out.read_text().splitlines()]
    assert [row["token_f1"] for row in rows] == pytest.approx(EXPECTED["token_f1"])
    assert set(rows[0]) == {"index", *SIMPLE}

    assert main([*argv[:4], "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"].keys() == set(SIMPLE)


def test_predictions_keep_their_locations(predictions_file):
    predictions = read_predictions(predictions_file)
    assert isinstance(predictions, Predictions)
    assert predictions.locations[2].endswith("preds.jsonl:3")
    assert set(METRICS) > set(TEXT_METRICS)
