"""Score a predictions file: text metrics per record, and their means with bootstrap CIs.

The input is what `lmlab predict` writes, one JSON object per line: the input record's
fields plus "prediction". `score_records` is the whole computation and takes plain
records, so `lmlab compare` (or a notebook) can score predictions that never touched
disk:

    >>> from lmlab.eval.score import read_predictions, score_records
    >>> report = score_records(read_predictions("preds.jsonl"), metrics=["exact_match"])
    >>> report.aggregates["exact_match"].value, report.aggregates["exact_match"].ci_low
    >>> report.records[0]            # {"index": 0, "exact_match": 1.0}
    >>> report.to_json()             # what `lmlab score --json` prints

Aggregates are means over records, except BLEU and chrF, which are corpus scores (n-gram
counts summed over the corpus, sacrebleu's 0-100 scale). The interval is a percentile
bootstrap: resample the records with replacement, recompute every aggregate, take the
2.5th and 97.5th percentiles. One resample serves every metric, and the draws depend only
on (seed, number of records), so two prediction files of the same records scored with the
same seed are resampled identically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from lmlab.errors import UserError
from lmlab.eval.text_metrics import (
    ROUGE_TYPES,
    CorpusMetric,
    RougeMetric,
    exact_match,
    jaccard,
    normalized_exact_match,
    token_f1,
)
from lmlab.fileio import atomic_write_json, atomic_write_text

Metric = Literal[
    "exact_match",
    "normalized_exact_match",
    "token_f1",
    "jaccard",
    "rouge1",
    "rouge2",
    "rougeL",
    "bleu",
    "chrf",
    "execution_accuracy",
]
METRICS: tuple[Metric, ...] = get_args(Metric)
"""Every metric name `score_records` and `--metrics` accept."""

EXECUTION_METRIC: Metric = "execution_accuracy"
TEXT_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m != EXECUTION_METRIC)
"""Metrics that compare the prediction with a reference text."""
CORPUS_METRICS: tuple[Metric, ...] = ("bleu", "chrf")
"""Aggregated as one corpus score on a 0-100 scale, not as a mean of record scores."""
VALID_FRACTION = "valid_fraction"
"""Reported beside execution_accuracy: the share of lines whose program parses and checks."""

PREDICTION_FIELD = "prediction"
REFERENCE_FIELDS = ("reference", "completion", "answer", "target", "output")
"""Where the reference is looked for, in this order, when no field is named."""
CONFIDENCE = 0.95
FORMAT = "lmlab-score"
FORMAT_VERSION = 1

_SIMPLE_METRICS = {
    "exact_match": exact_match,
    "normalized_exact_match": normalized_exact_match,
    "token_f1": token_f1,
    "jaccard": jaccard,
}


# ---------------------------------------------------------------------------------------
# Reading


@dataclass
class Predictions:
    """Records of a predictions file and where each came from ("FILE:LINE", for errors)."""

    records: list[dict[str, Any]]
    locations: list[str]
    path: str | None = None


def read_predictions(path: str | Path) -> Predictions:
    """The JSON-object lines of a JSONL file (blank lines skipped); UserError on bad lines."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: expected a predictions .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"predictions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    records, locations = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        locations.append(where)
    if not records:
        raise UserError(f"{path} holds no records")
    return Predictions(records, locations, str(path))


def _fields(record: dict[str, Any]) -> str:
    return ", ".join(map(repr, record)) or "no fields"


def _as_references(value: Any, name: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise UserError(f"{where}: reference {name!r} must be a string or a non-empty list of strings")


def find_references(record: dict[str, Any], reference_field: str | None, where: str) -> list[str]:
    """The reference text(s) of a record: the named field, or else the first present of
    REFERENCE_FIELDS, or else the content of a final assistant turn in "messages"."""
    if reference_field is not None:
        if reference_field not in record:
            raise UserError(
                f"{where}: no reference field {reference_field!r} (the record has {_fields(record)})"
            )
        return _as_references(record[reference_field], reference_field, where)
    for name in REFERENCE_FIELDS:
        if name in record:
            return _as_references(record[name], name, where)
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            return _as_references(last.get("content"), "messages[-1].content", where)
    raise UserError(
        f"{where}: no reference: none of {', '.join(REFERENCE_FIELDS)} and no final assistant "
        f"message (the record has {_fields(record)}); name one with --reference-field"
    )


# ---------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class MetricScore:
    """One aggregate: its value, the bootstrap interval (None without resampling), records."""

    value: float
    ci_low: float | None
    ci_high: float | None
    n: int


@dataclass
class ScoreReport:
    """Aggregates by metric name, and one dict of scores per record ({"index", metric...})."""

    metrics: list[str]
    """Names in `aggregates` and in each record, in order (valid_fraction after
    execution_accuracy)."""
    aggregates: dict[str, MetricScore]
    records: list[dict[str, Any]]
    prediction_field: str
    reference_field: str | None
    bootstrap: int
    seed: int
    source: str | None = None
    resamples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Each aggregate recomputed on every bootstrap resample, (bootstrap,) by name. Two
    reports of the same number of records and seed share their resamples, so B - A of
    these is the paired bootstrap of a difference (what `lmlab compare` reports)."""

    def to_json(self) -> dict[str, Any]:
        """The aggregate report, as `lmlab score --json` prints and `--out` writes it."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "predictions": self.source,
            "records": len(self.records),
            "prediction_field": self.prediction_field,
            "reference_field": self.reference_field or "auto",
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "confidence": CONFIDENCE,
            "metrics": {
                name: {
                    "value": score.value,
                    "ci_low": score.ci_low,
                    "ci_high": score.ci_high,
                    "n": score.n,
                    "scale": metric_scale(name),
                }
                for name, score in self.aggregates.items()
            },
        }


def metric_scale(name: str) -> str:
    """'0-100' for the sacrebleu corpus metrics, '0-1' for everything else."""
    return "0-100" if name in CORPUS_METRICS else "0-1"


def check_bootstrap(bootstrap: int, seed: int) -> None:
    """Resamples: a count >= 0; the seed: a numpy seed, an integer >= 0."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise UserError(f"--bootstrap must be a number of resamples >= 0, got {bootstrap!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"the bootstrap seed must be an integer >= 0, got {seed!r}")


def parse_metrics(metrics: str | Sequence[str]) -> list[Metric]:
    """Metric names from "a,b,c" or a list, in order, duplicates dropped; UserError on
    an unknown one."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    chosen: list[Metric] = []
    for raw in names:
        name = raw.strip()
        if name not in METRICS:
            raise UserError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
        if name not in chosen:
            chosen.append(name)  # type: ignore[arg-type]
    if not chosen:
        raise UserError(f"no metrics given; known metrics: {', '.join(METRICS)}")
    return chosen


def _execution_scores(
    records: list[dict[str, Any]], predictions: list[str], locations: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(exact, valid) per record, each 0/1: `PROMPT PREDICTION` scored by the language's
    interpreter through `lmlab.data.dsl.registry.evaluate`, as `lmlab dsl eval` does.

    The prediction is stripped but otherwise whole: a model that runs on past its answer
    (say, onto a new line) does not match, exactly as that line would fail in a file.
    """
    from lmlab.data.dsl.registry import evaluate, get_language

    exact, valid = np.zeros(len(records)), np.zeros(len(records))
    for i, (record, prediction, where) in enumerate(
        zip(records, predictions, locations, strict=True)
    ):
        name = record.get("dsl")
        if not isinstance(name, str):
            raise UserError(
                f"{where}: {EXECUTION_METRIC} needs practice-language records with a 'dsl' "
                f"field (from `lmlab predict --input dsl:NAME`); this one has {_fields(record)}"
            )
        try:
            lang = get_language(name)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: {EXECUTION_METRIC} needs the record's 'prompt' string")
        overall = evaluate(lang, [f"{prompt} {prediction.strip()}"])["overall"]
        exact[i], valid[i] = overall["exact_match"], overall["valid_fraction"]
    return exact, valid


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The central CONFIDENCE interval of bootstrap samples (percentile method)."""
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_resamples(
    means: dict[str, np.ndarray],
    corpus: dict[str, tuple[CorpusMetric, np.ndarray]],
    n: int,
    bootstrap: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Every aggregate recomputed on `bootstrap` resamples of the records, (bootstrap,) each.

    A resample is a vector of counts (how often each record was drawn), so a mean is
    counts @ scores / n and a corpus score is computed from counts @ statistics. One draw
    of n indices per resample keeps the stream independent of any chunking.
    """
    rng = np.random.default_rng(seed)
    names = list(means)
    columns = np.stack([means[k] for k in names], axis=1) if names else np.zeros((n, 0))
    samples = {name: np.empty(bootstrap) for name in [*names, *corpus]}
    for b in range(bootstrap):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)  # (N,)
        resampled_means = counts @ columns / n  # (M,)
        for j, name in enumerate(names):
            samples[name][b] = resampled_means[j]
        for name, (metric, statistics) in corpus.items():
            samples[name][b] = metric.corpus_score(counts @ statistics)
    return samples


def score_records(
    records: Predictions | Sequence[dict[str, Any]],
    metrics: str | Sequence[str] | None = None,
    reference_field: str | None = None,
    prediction_field: str = PREDICTION_FIELD,
    bootstrap: int = 1000,
    seed: int = 0,
) -> ScoreReport:
    """Score predictions against references; see the module docstring.

    `records` are dicts with the prediction and a reference (or `Predictions` from
    `read_predictions`, whose FILE:LINE locations then appear in errors). `metrics`
    defaults to every text metric, plus execution_accuracy when every record has "dsl".
    `reference_field` None looks for the reference as `find_references` describes.
    `bootstrap` resamples (0: no interval); the same `seed` gives the same intervals.
    Raises UserError for every bad input before computing anything.
    """
    if isinstance(records, Predictions):
        locations, source, rows = records.locations, records.path, records.records
    else:
        rows = list(records)
        locations, source = [f"record {i + 1}" for i in range(len(rows))], None
    if not rows:
        raise UserError("no records to score")
    check_bootstrap(bootstrap, seed)
    if metrics is None:
        every_dsl = all("dsl" in r for r in rows)
        chosen = [*TEXT_METRICS, *([EXECUTION_METRIC] if every_dsl else [])]
    else:
        chosen = parse_metrics(metrics)
    text_metrics = [m for m in chosen if m in TEXT_METRICS]

    # Check every record (and load the libraries) before scoring any of them.
    predictions: list[str] = []
    references: list[list[str]] = []
    for record, where in zip(rows, locations, strict=True):
        if prediction_field not in record:
            raise UserError(
                f"{where}: no prediction field {prediction_field!r} (the record has {_fields(record)})"
            )
        prediction = record[prediction_field]
        if not isinstance(prediction, str):
            raise UserError(
                f"{where}: prediction {prediction_field!r} must be a string, "
                f"got {type(prediction).__name__}"
            )
        predictions.append(prediction)
        if text_metrics:
            references.append(find_references(record, reference_field, where))
    rouge = RougeMetric() if any(m in ROUGE_TYPES for m in chosen) else None
    corpus_metrics = {m: CorpusMetric(m) for m in chosen if m in CORPUS_METRICS}

    n = len(rows)
    per_record: dict[str, np.ndarray] = {}  # name -> (N,)
    if EXECUTION_METRIC in chosen:
        exact, valid = _execution_scores(rows, predictions, locations)
    for name in chosen:
        if name in _SIMPLE_METRICS:
            function = _SIMPLE_METRICS[name]
            per_record[name] = np.array(
                [function(p, refs) for p, refs in zip(predictions, references, strict=True)]
            )
        elif name in CORPUS_METRICS:
            metric = corpus_metrics[name]
            per_record[name] = np.array(
                [
                    metric.sentence_score(p, refs)
                    for p, refs in zip(predictions, references, strict=True)
                ]
            )
        elif name == EXECUTION_METRIC:
            per_record[name], per_record[VALID_FRACTION] = exact, valid
    if rouge is not None:
        rouge_rows = [rouge.score(p, refs) for p, refs in zip(predictions, references, strict=True)]
        for name in ROUGE_TYPES:
            if name in chosen:
                per_record[name] = np.array([row[name] for row in rouge_rows])
    names = [
        name
        for metric in chosen
        for name in ([metric, VALID_FRACTION] if metric == EXECUTION_METRIC else [metric])
    ]

    # Point values: means, except the corpus metrics.
    statistics = {
        name: (metric, metric.statistics(predictions, references))
        for name, metric in corpus_metrics.items()
    }
    values = {name: float(per_record[name].mean()) for name in names if name not in statistics}
    for name, (metric, stats) in statistics.items():
        values[name] = metric.corpus_score(stats.sum(axis=0))
    resamples = (
        bootstrap_resamples(
            {k: per_record[k] for k in names if k not in statistics}, statistics, n, bootstrap, seed
        )
        if bootstrap
        else {}
    )
    intervals = {name: percentile_interval(values) for name, values in resamples.items()}
    aggregates = {
        name: MetricScore(values[name], *intervals.get(name, (None, None)), n=n) for name in names
    }
    record_scores = [
        {"index": i, **{name: float(per_record[name][i]) for name in names}} for i in range(n)
    ]
    return ScoreReport(
        metrics=names,
        aggregates=aggregates,
        records=record_scores,
        prediction_field=prediction_field,
        reference_field=reference_field,
        bootstrap=bootstrap,
        seed=seed,
        source=source,
        resamples=resamples,
    )


# ---------------------------------------------------------------------------------------
# Writing


def write_report(report: ScoreReport, path: str | Path) -> None:
    """The aggregate JSON, written atomically."""
    atomic_write_json(path, report.to_json())


def write_record_scores(report: ScoreReport, path: str | Path) -> None:
    """One JSON line per record: its index and its score on each metric, written atomically."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in report.records))
