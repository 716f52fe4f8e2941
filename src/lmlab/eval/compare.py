"""Two models on one task: predict with each, score both, and report the differences.

`lmlab compare BEFORE AFTER --task FILE` is the before/after view of a fine-tune. Both
models see the same records with the same generation options; both predictions files are
scored with the same seed, so their bootstrap resamples are the same records and the
interval of a difference is a paired bootstrap (tighter than comparing two intervals).

    >>> from lmlab.eval.compare import compare_predictions
    >>> report = compare_predictions(preds_a, preds_b, names=("base", "tuned"))
    >>> report.differences["exact_match"]  # MetricScore of B - A, with its 95% interval
    >>> report.disagreements[:3]          # records where the two scored differently
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.errors import UserError
from lmlab.eval.score import (
    CONFIDENCE,
    EXECUTION_METRIC,
    MetricScore,
    ScoreReport,
    find_references,
    metric_scale,
    percentile_interval,
    score_records,
)
from lmlab.generate.predict import PREDICTION_FIELD, PredictOptions, predict

FORMAT = "lmlab-compare"
FORMAT_VERSION = 1
PRIMARY_METRICS = (EXECUTION_METRIC, "exact_match", "token_f1")
"""The first of these that was scored decides which records "disagree"."""


@dataclass
class CompareReport:
    """Scores of A and B on the same records, B - A per metric, and disagreeing records."""

    names: tuple[str, str]
    a: ScoreReport
    b: ScoreReport
    differences: dict[str, MetricScore]
    """B - A by metric: the difference of the aggregates, with a paired bootstrap interval."""
    primary: str
    disagreements: list[dict[str, Any]]
    """Records whose primary-metric score differs, largest difference first: {"index",
    "prompt", "reference", "a", "b", "score_a", "score_b"}."""

    def to_json(self) -> dict[str, Any]:
        """The report as `lmlab compare --json` prints it."""

        def interval(score: MetricScore) -> dict[str, Any]:
            return {"value": score.value, "ci_low": score.ci_low, "ci_high": score.ci_high}

        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "a": self.names[0],
            "b": self.names[1],
            "records": len(self.a.records),
            "bootstrap": self.a.bootstrap,
            "seed": self.a.seed,
            "confidence": CONFIDENCE,
            "primary_metric": self.primary,
            "metrics": {
                name: {
                    "a": interval(self.a.aggregates[name]),
                    "b": interval(self.b.aggregates[name]),
                    "b_minus_a": interval(self.differences[name]),
                    "scale": metric_scale(name),
                }
                for name in self.a.metrics
            },
            "disagreements": self.disagreements,
        }


def compare_predictions(
    predictions_a: Sequence[dict[str, Any]],
    predictions_b: Sequence[dict[str, Any]],
    *,
    names: tuple[str, str] = ("A", "B"),
    metrics: str | Sequence[str] | None = None,
    reference_field: str | None = None,
    prompt_field: str = "prompt",
    bootstrap: int = 1000,
    seed: int = 0,
    examples: int = 3,
) -> CompareReport:
    """Score two predictions of the same records and compare them; see the module docstring.

    The records must be the same task in the same order (their fields other than the
    prediction agree); `examples` caps the disagreements kept.
    """
    if len(predictions_a) != len(predictions_b):
        raise UserError(
            f"the two prediction sets differ in length ({len(predictions_a)} vs "
            f"{len(predictions_b)}): compare needs the same records"
        )
    if examples < 0:
        raise UserError(f"--examples must be >= 0, got {examples}")
    for i, (ra, rb) in enumerate(zip(predictions_a, predictions_b, strict=True)):
        if _without_prediction(ra) != _without_prediction(rb):
            raise UserError(
                f"record {i + 1} differs between the two prediction sets: compare needs the "
                "same records in the same order"
            )
    report_a = score_records(
        predictions_a, metrics, reference_field, bootstrap=bootstrap, seed=seed
    )
    report_b = score_records(
        predictions_b, metrics, reference_field, bootstrap=bootstrap, seed=seed
    )

    differences = {}
    for name in report_a.metrics:
        value = report_b.aggregates[name].value - report_a.aggregates[name].value
        low = high = None
        if bootstrap:
            # Same seed and record count: resample k of A and of B drew the same records.
            low, high = percentile_interval(report_b.resamples[name] - report_a.resamples[name])
        differences[name] = MetricScore(value, low, high, n=len(report_a.records))

    primary = next((m for m in PRIMARY_METRICS if m in report_a.metrics), report_a.metrics[0])
    changed = []
    for i, (sa, sb) in enumerate(zip(report_a.records, report_b.records, strict=True)):
        if sa[primary] != sb[primary]:
            changed.append((abs(sb[primary] - sa[primary]), i))
    changed.sort(key=lambda item: (-item[0], item[1]))
    disagreements = []
    for _, i in changed[:examples]:
        record = predictions_a[i]
        disagreements.append(
            {
                "index": i,
                "prompt": _prompt_text(record, prompt_field),
                "reference": _reference_text(record, reference_field),
                "a": record[PREDICTION_FIELD],
                "b": predictions_b[i][PREDICTION_FIELD],
                "score_a": report_a.records[i][primary],
                "score_b": report_b.records[i][primary],
            }
        )
    return CompareReport(names, report_a, report_b, differences, primary, disagreements)


def compare_models(
    model_a: str,
    model_b: str,
    records: list[dict[str, Any]],
    options: PredictOptions,
    *,
    device: str = "cpu",
    metrics: str | Sequence[str] | None = None,
    reference_field: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    examples: int = 3,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[CompareReport, list[dict[str, Any]], list[dict[str, Any]]]:
    """Predict `records` with each model (one loaded at a time), then compare_predictions.

    Returns the report and both prediction lists. `on_progress(model, records_done)`,
    model 0 for A and 1 for B.
    Metrics are checked before any model is loaded, so a typo costs no generation.
    """
    from lmlab.eval.score import check_bootstrap, parse_metrics
    from lmlab.runs.load import load_model

    options.check()
    check_bootstrap(bootstrap, seed)
    if metrics is not None:
        parse_metrics(metrics)
    names = (model_a, model_b)
    outputs = []
    for which, name in enumerate(names):
        loaded = load_model(name, device)
        report = (lambda done, which=which: on_progress(which, done)) if on_progress else None
        outputs.append(predict(loaded, records, options, on_progress=report))
        del loaded  # one model in memory at a time
    report = compare_predictions(
        outputs[0],
        outputs[1],
        names=names,
        metrics=metrics,
        reference_field=reference_field,
        prompt_field=options.prompt_field,
        bootstrap=bootstrap,
        seed=seed,
        examples=examples,
    )
    return report, outputs[0], outputs[1]


def to_markdown(report: CompareReport) -> str:
    """The comparison as a Markdown table, then the disagreeing examples."""
    a, b = report.names
    lines = [
        f"| metric | A | B | B - A | {CONFIDENCE:.0%} CI of B - A |",
        "|---|---:|---:|---:|---|",
    ]
    for name in report.a.metrics:
        digits = 2 if metric_scale(name) == "0-100" else 4
        diff = report.differences[name]
        ci = (
            f"[{diff.ci_low:+.{digits}f}, {diff.ci_high:+.{digits}f}]"
            if diff.ci_low is not None
            else "-"
        )
        lines.append(
            f"| {name} | {report.a.aggregates[name].value:.{digits}f} "
            f"| {report.b.aggregates[name].value:.{digits}f} | {diff.value:+.{digits}f} | {ci} |"
        )
    lines += ["", f"A = `{a}`, B = `{b}`; {len(report.a.records)} records."]
    if report.disagreements:
        lines += ["", f"Examples where {report.primary} differs:"]
        for example in report.disagreements:
            lines += [
                "",
                f"- record {example['index'] + 1}: prompt `{_one_line(example['prompt'])}`, "
                f"reference `{_one_line(example['reference'])}`",
                f"  - A ({example['score_a']:.2f}): `{_one_line(example['a'])}`",
                f"  - B ({example['score_b']:.2f}): `{_one_line(example['b'])}`",
            ]
    return "\n".join(lines) + "\n"


def _without_prediction(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != PREDICTION_FIELD}


def _reference_text(record: dict[str, Any], reference_field: str | None) -> str | None:
    try:
        return " | ".join(find_references(record, reference_field, "record"))
    except UserError:
        return None  # execution accuracy alone needs no reference text


def _prompt_text(record: dict[str, Any], prompt_field: str) -> str:
    if isinstance(record.get(prompt_field), str):
        return record[prompt_field]
    messages = record.get("messages")
    if isinstance(messages, list):
        turns = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if turns:
            return str(turns[-1].get("content", ""))
    return ""


def _one_line(value: Any, width: int = 80) -> str:
    text = " ".join(str(value if value is not None else "").split()).replace("`", "'")
    return text if len(text) <= width else text[: width - 3] + "..."
