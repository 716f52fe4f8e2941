"""The practice languages by name, and what works on any of them: corpora and scoring.

Add a language by writing its module (a `Language` subclass and its instance) and
listing the instance in `_BY_NAME`; `lmlab dsl`, `prepare --input dsl:NAME` and the
quickstart pick it up from here.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from lmlab.data.dsl.common import (
    SPLITS,
    DSLError,
    Language,
    format_line,
    parse_difficulty,
    randint,
    split_line,
    split_of,
)
from lmlab.data.dsl.dimmatch import DIMMATCH
from lmlab.data.dsl.flowroll import FLOWROLL
from lmlab.errors import UserError

_BY_NAME: dict[str, Language[Any]] = {lang.name: lang for lang in (FLOWROLL, DIMMATCH)}

LANGUAGES: tuple[str, ...] = tuple(_BY_NAME)
"""Names accepted by `get_language`."""


def get_language(name: str) -> Language[Any]:
    """The practice language called `name` (one of LANGUAGES)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _BY_NAME:
        raise UserError(f"unknown practice language {name!r}; valid names: {', '.join(LANGUAGES)}")
    return _BY_NAME[key]


def generate_corpus(
    lang: Language[Any] | str,
    n: int,
    seed: int,
    difficulty: int | tuple[int, int] | str,
    split: str = "train",
) -> list[str]:
    """`n` lines `PROGRAM => RESULT` of distinct programs that all belong to `split`.

    `difficulty` is one level or an inclusive range, drawn uniformly per program. The same
    arguments always give the same lines. Raises UserError when the requested split and
    difficulty hold too few distinct programs to find `n` of them. Programs are drawn from
    the generator and kept if they hash into `split`, so a val or test corpus costs about
    20 draws per line against 1.1 for train.
    """
    lang = get_language(lang) if isinstance(lang, str) else lang
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"number of lines must be a positive integer, got {n!r}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    low, high = parse_difficulty(difficulty, lang.difficulties)

    rng = random.Random(seed)
    seen: set[str] = set()
    lines: list[str] = []
    # About 1 draw in 20 lands in val or test, so give up only after far more misses in a
    # row than chance would ever produce; then the space itself is (nearly) exhausted.
    max_misses_in_a_row = 20_000
    misses = 0
    while len(lines) < n:
        # Trees, not text: skipping a parse per program keeps 20k lines well under a second.
        tree = lang.generate(rng, randint(rng, low, high))
        program = lang.format(tree)
        if program in seen or split_of(program) != split:
            misses += 1
            if misses > max_misses_in_a_row:
                raise UserError(
                    f"found only {len(lines)} distinct {split} programs of difficulty "
                    f"{low}-{high} in {lang.name} (asked for {n}); ask for fewer lines "
                    f"or a wider difficulty range"
                )
            continue
        misses = 0
        seen.add(program)
        lines.append(format_line(program, lang.evaluate(tree)))
    return lines


# ---------------------------------------------------------------------------------------
# Evaluation


def _rates(count: int, valid: int, exact: int) -> dict[str, Any]:
    return {
        "count": count,
        "valid_fraction": valid / count if count else 0.0,
        "exact_match": exact / count if count else 0.0,
    }


def evaluate(lang: Language[Any] | str, lines: Iterable[str]) -> dict[str, Any]:
    """Score model outputs given as lines `PROGRAM => PREDICTED_RESULT`.

    A line is valid when it has a '=>' and its program parses and type-checks; it is an
    exact match when the stripped prediction equals the reference result. Blank lines are
    skipped. Returns `{"language", "overall", "by_difficulty"}`, where each score is
    `{"count", "valid_fraction", "exact_match"}` and exact_match is over all lines
    (invalid ones count as wrong). Lines whose program does not parse have no difficulty
    and appear in "overall" only; "by_difficulty" is keyed by the level as a string.
    """
    lang = get_language(lang) if isinstance(lang, str) else lang
    # level (None: unknown) -> [count, valid, exact]
    tallies: dict[int | None, list[int]] = {}
    for line in lines:
        if not line.strip():
            continue
        level: int | None = None
        valid = exact = False
        try:
            program, predicted = split_line(line)
            tree = lang.parse(program)
            level = lang.difficulty(tree)
            reference = lang.evaluate(tree)
            valid = True
            exact = predicted == reference
        except DSLError:
            pass
        tally = tallies.setdefault(level, [0, 0, 0])
        tally[0] += 1
        tally[1] += valid
        tally[2] += exact

    totals = [sum(t[i] for t in tallies.values()) for i in range(3)]
    known_levels = sorted(level for level in tallies if level is not None)
    return {
        "language": lang.name,
        "overall": _rates(*totals),
        "by_difficulty": {str(level): _rates(*tallies[level]) for level in known_levels},
    }
