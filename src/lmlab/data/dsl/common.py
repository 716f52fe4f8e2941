"""What the practice languages share: the Language base, the line format and the splits.

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
from collections.abc import Sequence
from typing import Generic, TypeVar

from lmlab.errors import UserError

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
