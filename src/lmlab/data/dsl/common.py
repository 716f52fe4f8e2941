"""What the practice languages share: the Language base, line format, splits, corpora, scoring.

Every practice language is a small novel programming language with a reference
interpreter, so "did the model learn it?" is an exact-match number. A corpus is a list of
lines `PROGRAM => RESULT`; a model is prompted with `PROGRAM =>` and must complete
` RESULT`.

Which split a program belongs to depends only on a hash of its canonical text, never on a
seed, so held-out programs never move and train, val and test share no program.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from lmlab.errors import UserError

LANGUAGES: tuple[str, ...] = ("flowroll", "dimmatch")
"""Names accepted by `get_language`."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Split names, in the order of their hash buckets."""

DIFFICULTIES = range(1, 6)
"""Difficulty levels (number of operations) that both languages' generators support."""

SEPARATOR = " => "
"""Between a program and its result on a corpus line."""

# Out of 1000 hash buckets: [0, 900) train, [900, 950) val, [950, 1000) test.
_SPLIT_BUCKET_ENDS = (900, 950, 1000)
# Part of the hash: changing it (or the fractions above) moves every held-out program, so
# bump the version if you ever must.
_SPLIT_HASH_PERSON = b"lmlab-dsl-split1"

T = TypeVar("T")
TreeT = TypeVar("TreeT")


class DSLError(ValueError):
    """A program that has no result: it does not parse or does not type-check."""


class DSLSyntaxError(DSLError):
    """A malformed program; `position` is the 0-based character offset of the problem."""

    def __init__(self, message: str, text: str, position: int) -> None:
        self.message = message
        self.text = text
        self.position = position
        super().__init__(f"{message} at column {position + 1} in {text!r}")


class DSLTypeError(DSLError):
    """A program that parses but is ill-typed (e.g. FLOWROLL `sort` after `sum`)."""


class Scanner:
    """A cursor over program text for hand-written recursive-descent parsers.

    The languages are small enough that a separate tokenizer would only add code; parsers
    read characters directly and report errors at the exact offset.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_spaces(self) -> None:
        """Move past any whitespace."""
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        """True when only whitespace is left."""
        self.skip_spaces()
        return self.pos >= len(self.text)

    def peek(self) -> str:
        """The next character, or '' at the end."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, literal: str) -> bool:
        """Consume `literal` if the text continues with it."""
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        """Consume `literal` (after optional whitespace) or raise a syntax error."""
        self.skip_spaces()
        if not self.take(literal):
            raise self.error(f"expected {literal!r}")

    def word(self) -> str:
        """Read a run of ASCII letters (a keyword); empty if there is none."""
        start = self.pos
        while self.pos < len(self.text) and "a" <= self.text[self.pos].lower() <= "z":
            self.pos += 1
        return self.text[start : self.pos]

    def integer(self, signed: bool = False) -> int:
        """Read a decimal integer, with an optional leading '-' when `signed`."""
        start = self.pos
        if signed:
            self.take("-")
        digits_start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
            self.pos += 1
        if self.pos == digits_start:
            self.pos = start
            raise self.error("expected an integer" if signed else "expected a non-negative integer")
        return int(self.text[start : self.pos])

    def error(self, message: str, position: int | None = None) -> DSLSyntaxError:
        """A syntax error at `position` (default: here) that names what was found there."""
        position = self.pos if position is None else position
        found = repr(self.text[position]) if position < len(self.text) else "end of program"
        return DSLSyntaxError(f"{message}, found {found}", self.text, position)


# The generators draw a few dozen numbers per program. `random.Random.randint` and
# `.choice` go through several Python-level calls each, which made them most of the cost
# of generating a corpus; these use one C-level `random()` draw (still seeded by `rng`).


def randint(rng: random.Random, low: int, high: int) -> int:
    """A uniform integer in [low, high], like `rng.randint` but faster."""
    return low + int(rng.random() * (high - low + 1))


def choice(rng: random.Random, options: Sequence[T]) -> T:
    """A uniformly chosen element of `options`, like `rng.choice` but faster."""
    return options[int(rng.random() * len(options))]


class Language(ABC, Generic[TreeT]):
    """A practice language: parser, canonical formatter, reference interpreter, generator.

    Subclasses implement the tree-level methods (`parse`, `format`, `evaluate`,
    `generate`, `difficulty`); the string-level API on top is shared.
    """

    name: str
    """Short lowercase name, as accepted by `get_language`."""
    difficulties: range
    """Difficulty levels the generator supports."""

    @abstractmethod
    def parse(self, program: str) -> TreeT:
        """Parse program text into a tree; raise DSLSyntaxError if it is malformed."""

    @abstractmethod
    def format(self, tree: TreeT) -> str:
        """Canonical text of a tree; `parse(format(t)) == t`."""

    @abstractmethod
    def evaluate(self, tree: TreeT) -> str:
        """Canonical result of a parsed program; raise DSLTypeError if it is ill-typed."""

    @abstractmethod
    def generate(self, rng: random.Random, difficulty: int) -> TreeT:
        """A random well-formed program tree of exactly `difficulty`, drawn from `rng` only."""

    @abstractmethod
    def difficulty(self, tree: TreeT) -> int:
        """Difficulty of a program tree (for both languages: its number of operations)."""

    def generate_program(self, rng: random.Random, difficulty: int) -> str:
        """A random canonical program; the same `rng` state gives the same program."""
        if isinstance(difficulty, bool) or difficulty not in self.difficulties:
            raise UserError(
                f"{self.name} difficulty must be an integer from {self.difficulties.start} "
                f"to {self.difficulties.stop - 1}, got {difficulty!r}"
            )
        return self.format(self.generate(rng, difficulty))

    def run(self, program: str) -> str:
        """Run a program with the reference interpreter and return its canonical result."""
        return self.evaluate(self.parse(program))

    def difficulty_of(self, program: str) -> int:
        """Difficulty of program text (raises DSLSyntaxError if it does not parse)."""
        return self.difficulty(self.parse(program))

    def canonical(self, program: str) -> str:
        """The canonical spelling of program text (whitespace and the like normalised)."""
        return self.format(self.parse(program))

    def __repr__(self) -> str:
        return f"<practice language {self.name}>"


def get_language(name: str) -> Language[Any]:
    """The practice language called `name` (one of LANGUAGES)."""
    # Imported here, not at the top: both language modules import this one.
    from lmlab.data.dsl.dimmatch import DIMMATCH
    from lmlab.data.dsl.flowroll import FLOWROLL

    by_name: dict[str, Language[Any]] = {FLOWROLL.name: FLOWROLL, DIMMATCH.name: DIMMATCH}
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in by_name:
        raise UserError(f"unknown practice language {name!r}; valid names: {', '.join(LANGUAGES)}")
    return by_name[key]


def _as_language(lang: Language[Any] | str) -> Language[Any]:
    return get_language(lang) if isinstance(lang, str) else lang


# ---------------------------------------------------------------------------------------
# Line format


def format_line(program: str, result: str) -> str:
    """One corpus line: `PROGRAM => RESULT`."""
    return f"{program}{SEPARATOR}{result}"


def format_prompt(program: str) -> str:
    """What a model is prompted with: `PROGRAM =>` (it must complete ` RESULT`)."""
    return f"{program}{SEPARATOR.rstrip()}"


def split_line(line: str) -> tuple[str, str]:
    """Split `PROGRAM => RESULT` at the first '=>' into stripped (program, result).

    Whitespace around '=>' is not required, so an empty completion (`PROGRAM =>`) still
    yields a program and an empty result. Raises DSLSyntaxError if there is no '=>'.
    """
    program, sep, result = line.partition(SEPARATOR.strip())
    if not sep:
        raise DSLSyntaxError("expected 'PROGRAM => RESULT', found no '=>'", line, len(line))
    return program.strip(), result.strip()


# ---------------------------------------------------------------------------------------
# Splits


def split_of(program: str) -> str:
    """'train', 'val' or 'test' (90/5/5) from a hash of the canonical program text.

    Pass canonical text (as generated, or `lang.canonical(text)`): two spellings of one
    program may hash to different splits.
    """
    digest = hashlib.blake2b(
        program.strip().encode("utf-8"), digest_size=8, person=_SPLIT_HASH_PERSON
    ).digest()
    bucket = int.from_bytes(digest, "big") % _SPLIT_BUCKET_ENDS[-1]
    for split, end in zip(SPLITS, _SPLIT_BUCKET_ENDS, strict=True):
        if bucket < end:
            return split
    raise AssertionError("unreachable: the last bucket end covers every bucket")


# ---------------------------------------------------------------------------------------
# Corpus generation

_DIFFICULTY_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_difficulty(
    spec: int | tuple[int, int] | str, allowed: range = DIFFICULTIES
) -> tuple[int, int]:
    """Inclusive (low, high) from `3`, `(1, 3)` or `"1-3"`, checked against `allowed`."""
    low: int | None = None
    high: int | None = None
    if isinstance(spec, int) and not isinstance(spec, bool):
        low = high = spec
    elif isinstance(spec, tuple) and len(spec) == 2 and all(type(x) is int for x in spec):
        low, high = spec
    elif isinstance(spec, str) and (m := _DIFFICULTY_RE.match(spec)):
        low = int(m.group(1))
        high = int(m.group(2) or m.group(1))
    if low is None or high is None or not (allowed.start <= low <= high < allowed.stop):
        raise UserError(
            f"difficulty must be an integer or a range like 1-3 within "
            f"{allowed.start}-{allowed.stop - 1}, got {spec!r}"
        )
    return low, high


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
    lang = _as_language(lang)
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
    lang = _as_language(lang)
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
