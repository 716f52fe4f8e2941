"""Metrics that compare a predicted text with one or more reference texts.

Each function scores one prediction against a non-empty list of references and takes the
best reference, the usual convention when several answers are acceptable. Three families:

- SQuAD-style answer matching (exact match, normalised exact match, token F1, Jaccard):
  pure Python, 0-1.
- ROUGE-1/2/L F-measure from Google's `rouge-score` package, 0-1.
- BLEU and chrF from `sacrebleu`, on sacrebleu's 0-100 scale. A sentence score per
  record, and a corpus score that is *not* the mean of sentence scores: n-gram counts are
  summed over the corpus first. `CorpusMetric` keeps those counts per record so that a
  bootstrap resample costs a sum, not a re-tokenisation of the corpus.

rouge-score and sacrebleu are the `eval` extra; they are imported only when a metric that
needs them is asked for.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmlab.errors import UserError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
"""The ROUGE variants we report: unigram, bigram and longest-common-subsequence overlap."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _import_eval_extra(module: str, package: str, metric: str) -> Any:
    """Import an optional scoring library, or tell the user which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"scoring {metric} needs {package}: pip install 'lmlab[eval]'") from None


# ---------------------------------------------------------------------------------------
# SQuAD-style answer matching


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The normalisation of the SQuAD evaluation script, so that "The Eiffel Tower." and
    "eiffel tower" count as the same answer.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference after stripping surrounding whitespace."""
    prediction = prediction.strip()
    return float(any(prediction == ref.strip() for ref in references))


def normalized_exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference after `normalize_answer`."""
    prediction = normalize_answer(prediction)
    return float(any(prediction == normalize_answer(ref) for ref in references))


def _f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    # An empty answer matches only an empty answer (SQuAD 2.0's "no answer" convention).
    if not prediction_tokens or not reference_tokens:
        return float(prediction_tokens == reference_tokens)
    # Counts, not sets: a word said twice in both texts is two matches.
    common = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (best reference)."""
    tokens = normalize_answer(prediction).split()
    return max(_f1(tokens, normalize_answer(ref).split()) for ref in references)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def jaccard(prediction: str, references: Sequence[str]) -> float:
    """|P ∩ R| / |P ∪ R| of the normalised token sets (best reference); both empty = 1.0."""
    tokens = set(normalize_answer(prediction).split())
    return max(_jaccard(tokens, set(normalize_answer(ref).split())) for ref in references)


# ---------------------------------------------------------------------------------------
# ROUGE


class RougeMetric:
    """ROUGE-1/2/L F-measures of predictions, best reference per type (`score_multi`).

    rouge-score's own tokenizer lower-cases and keeps only ASCII letters and digits, so
    text in other scripts scores 0; no stemming (the library's default).
    """

    def __init__(self) -> None:
        rouge_scorer = _import_eval_extra("rouge_score.rouge_scorer", "rouge-score", "ROUGE")
        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))

    def score(self, prediction: str, references: Sequence[str]) -> dict[str, float]:
        """{"rouge1", "rouge2", "rougeL"} -> F-measure in 0-1."""
        scores = self._scorer.score_multi(list(references), prediction)
        return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


# ---------------------------------------------------------------------------------------
# BLEU and chrF


class CorpusMetric:
    """BLEU or chrF (sacrebleu, default settings): sentence scores and corpus scores.

    `statistics` gives each record's sufficient statistics (n-gram match and length
    counts); a corpus score is computed from their sum, which is exactly what sacrebleu's
    `corpus_score` does, so `corpus_score(statistics.sum(0))` equals `corpus_bleu` /
    `corpus_chrf` on the same texts, and a resample weights the rows instead of re-reading
    the texts. This uses sacrebleu's internal `_extract_corpus_statistics` and
    `_compute_score_from_stats`, the pair its own bootstrap uses; a test guards them.
    """

    def __init__(self, name: str) -> None:
        metrics = _import_eval_extra("sacrebleu.metrics", "sacrebleu", name.upper())
        if name == "bleu":
            # Sentence BLEU needs effective order (skip n-gram orders longer than the
            # sentence), as sacrebleu.sentence_bleu does; corpus BLEU does not.
            self._corpus, self._sentence = metrics.BLEU(), metrics.BLEU(effective_order=True)
        elif name == "chrf":
            self._corpus = self._sentence = metrics.CHRF()
        else:
            raise ValueError(f"not a sacrebleu metric: {name!r}")
        self.name = name

    def sentence_score(self, prediction: str, references: Sequence[str]) -> float:
        """Score of one prediction, 0-100 (sacrebleu.sentence_bleu / sentence_chrf)."""
        return float(self._sentence.sentence_score(prediction, list(references)).score)

    def statistics(
        self, predictions: Sequence[str], references: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """(N, S) sufficient statistics, one row per record."""
        # sacrebleu wants reference *streams* (the k-th reference of every record); a
        # record with fewer references pads its streams with None, which sacrebleu skips.
        n_streams = max(len(refs) for refs in references)
        streams = [
            [refs[k] if k < len(refs) else None for refs in references] for k in range(n_streams)
        ]
        rows = self._corpus._extract_corpus_statistics(list(predictions), streams)
        return np.asarray(rows, dtype=np.float64)

    def corpus_score(self, summed_statistics: np.ndarray) -> float:
        """Corpus score, 0-100, from statistics summed (or weighted-summed) over records."""
        return float(self._corpus._compute_score_from_stats(summed_statistics.tolist()).score)
