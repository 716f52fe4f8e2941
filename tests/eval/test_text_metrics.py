"""Text metrics: SQuAD-style matching on hand-checked strings, ROUGE/BLEU/chrF against
the libraries' own functions."""

from __future__ import annotations

import sys

import pytest

from lmlab.errors import UserError
from lmlab.eval.text_metrics import (
    ROUGE_TYPES,
    CorpusMetric,
    RougeMetric,
    exact_match,
    jaccard,
    normalize_answer,
    normalized_exact_match,
    token_f1,
)

HYPOTHESES = [
    "the cat sat on the mat",
    "a quick brown fox jumps over a lazy dog",
    "Paris is the capital of France.",
    "",
]
REFERENCES = [
    ["the cat is on the mat", "there is a cat on the mat"],
    ["the quick brown fox jumped over the lazy dog"],
    ["The capital of France is Paris.", "Paris"],
    ["nothing"],
]


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        # lower-case; '-' ',' '!' dropped (not replaced by a space); the article goes
        ("The  Eiffel-Tower, in Paris!", "eiffeltower in paris"),
        # only whole-word articles: "theater", "Banana", "another" keep their letters
        ("A theater, an Banana and THE another", "theater banana and another"),
        ("\tsay\n  it   again ", "say it again"),
        ("the a an", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_only_strips():
    assert exact_match(" Paris\n", ["Paris"]) == 1.0
    assert exact_match("paris", ["Paris"]) == 0.0
    assert exact_match("paris", ["London", "paris"]) == 1.0  # best of several references
    assert normalized_exact_match("The paris.", ["Paris"]) == 1.0
    assert normalized_exact_match("Paris France", ["Paris"]) == 0.0


def test_token_f1_by_hand():
    # normalised: [cat, sat, on, mat] vs [cat, sat, on, hat]: 3 common, P = R = 3/4
    assert token_f1("the cat sat on the mat", ["a cat sat on a hat"]) == pytest.approx(0.75)
    # counts, not sets: cat min(2,1) + dog min(1,2) = 2 common of 3 each: P = R = 2/3
    assert token_f1("cat cat dog", ["cat dog dog"]) == pytest.approx(2 / 3)
    # best reference: "dog" gives 0; "cat sat" gives P = 1, R = 1/2, F1 = 2/3
    assert token_f1("cat", ["dog", "cat sat"]) == pytest.approx(2 / 3)
    assert token_f1("dog", ["cat"]) == 0.0
    # an empty answer (after normalisation) matches only an empty answer
    assert token_f1("The", ["a"]) == 1.0
    assert token_f1("the", ["cat"]) == 0.0


def test_jaccard_by_hand():
    # {cat, sat, on, mat} vs {mat, on, cat}: 3 shared of 4
    assert jaccard("the cat sat on the mat", ["mat on cat cat"]) == pytest.approx(0.75)
    assert jaccard("red fruit", ["red apple", "blue"]) == pytest.approx(1 / 3)
    assert jaccard("the", ["an"]) == 1.0  # both empty
    assert jaccard("", ["cat"]) == 0.0


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    metric = RougeMetric()
    for hypothesis, refs in zip(HYPOTHESES, REFERENCES, strict=True):
        got = metric.score(hypothesis, refs)
        for name in ROUGE_TYPES:
            best = max(scorer.score(ref, hypothesis)[name].fmeasure for ref in refs)
            assert got[name] == pytest.approx(best), (hypothesis, name)
    assert 0 < metric.score(HYPOTHESES[0], REFERENCES[0])["rouge2"] < 1


@pytest.mark.parametrize("name", ["bleu", "chrf"])
def test_sentence_scores_match_sacrebleu(name):
    import sacrebleu

    sentence = {"bleu": sacrebleu.sentence_bleu, "chrf": sacrebleu.sentence_chrf}[name]
    metric = CorpusMetric(name)
    for hypothesis, refs in zip(HYPOTHESES, REFERENCES, strict=True):
        assert metric.sentence_score(hypothesis, refs) == pytest.approx(
            sentence(hypothesis, refs).score
        )


@pytest.mark.parametrize("name", ["bleu", "chrf"])
def test_corpus_score_from_statistics_matches_sacrebleu(name):
    import sacrebleu

    corpus = {"bleu": sacrebleu.corpus_bleu, "chrf": sacrebleu.corpus_chrf}[name]
    metric = CorpusMetric(name)
    # One reference each: plain streams.
    single = [refs[:1] for refs in REFERENCES]
    stats = metric.statistics(HYPOTHESES, single)
    assert stats.shape[0] == len(HYPOTHESES)
    expected = corpus(HYPOTHESES, [[refs[0] for refs in REFERENCES]]).score
    assert metric.corpus_score(stats.sum(0)) == pytest.approx(expected)
    assert 0 < expected < 100
    # Two references each.
    two = [[*refs, refs[0]][:2] for refs in REFERENCES]
    streams = [[refs[k] for refs in two] for k in range(2)]
    stats = metric.statistics(HYPOTHESES, two)
    assert metric.corpus_score(stats.sum(0)) == pytest.approx(corpus(HYPOTHESES, streams).score)
    # A resample is a weighted sum of rows: drawing records 0, 0, 2 is the corpus of those.
    stats = metric.statistics(HYPOTHESES, single)
    picked = [0, 0, 2]
    weights = [2.0, 0.0, 1.0, 0.0]
    assert metric.corpus_score(weights @ stats) == pytest.approx(
        corpus([HYPOTHESES[i] for i in picked], [[REFERENCES[i][0] for i in picked]]).score
    )


def test_missing_libraries_name_the_extra(monkeypatch):
    # None in sys.modules makes `import` raise ImportError, as if not installed.
    for module in ("rouge_score", "rouge_score.rouge_scorer", "sacrebleu", "sacrebleu.metrics"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(UserError, match=r"rouge-score: pip install 'lmlab\[eval\]'"):
        RougeMetric()
    with pytest.raises(UserError, match=r"BLEU needs sacrebleu: pip install 'lmlab\[eval\]'"):
        CorpusMetric("bleu")
    assert token_f1("a cat", ["the cat"]) == 1.0  # the pure-Python metrics still work
