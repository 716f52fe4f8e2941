"""Token caps and weighted mixtures of inputs for `lmlab prepare`.

    --input web.jsonl@0.7 hf:org/books@0.3 --max-tokens 50M
        70% of the 50M tokens from web.jsonl, 30% from the books, each within one document
    --max-tokens 10M                       the inputs in order, until 10M tokens in all
    --max-input-tokens 2M                  at most 2M tokens from each input

Tokens are counted per input over both splits, end-of-document tokens included. Two
parts make a mixture exact without knowing token counts in advance:

- reading (`MixedDocuments`) interleaves the inputs, always taking the next document from
  the input furthest behind its share, in estimated tokens (its characters over the
  characters per token of a sample of its first documents, encoded up front);
- writing (`TokenBudget`) sees each document's real token count, in input order, and writes
  a document only if that leaves its input nearer its target than stopping before it
  would; the first document that does not fit closes the input. Every input ends within
  half a document of its target.

Without --max-tokens a weighted mixture runs until its first input is exhausted; the other
inputs' targets are then set from that input's exact total, so the shares hold to the
accuracy of the reading estimate (a few percent); with --max-tokens they are exact.

What is written depends only on the data and the arguments, never on how fast workers
return results: reading consults the budget only to skip inputs that are closed (their
documents would not be written anyway), and an input's end reaches the writer as a marker
in the document stream. That is what lets `prepare --resume` continue a capped prepare.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmlab.data.corpus import Corpus, Document
from lmlab.errors import UserError

_WEIGHT = re.compile(r"^(?P<spec>.+)@(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def parse_inputs(inputs: list[str]) -> tuple[list[str], list[float] | None]:
    """`PATH@WEIGHT` specs -> (paths, weights normalised to sum 1), or weights None when no
    input has one. Either every input has a weight or none does."""
    specs, weights = [], []
    for text in inputs:
        match = _WEIGHT.match(text)
        specs.append(match["spec"] if match else text)
        weights.append(float(match["weight"]) if match else None)
    given = [w for w in weights if w is not None]
    if not given:
        return specs, None
    if len(given) != len(weights):
        raise UserError(
            "give every --input a weight (PATH@WEIGHT, e.g. web.jsonl@0.7 books/@0.3) or none"
        )
    if not all(math.isfinite(w) and w > 0 for w in given):
        raise UserError(f"--input weights must be positive, got {given}")
    total = sum(given)
    return specs, [w / total for w in given]


def parse_count(text: str) -> int:
    """A token count: 1000000, 1e6, 50M, 2.5B, 200K."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KkMmBbGg]?)\s*", text)
    if not match:
        raise UserError(f"{text!r} is not a token count (e.g. 1000000, 1e6, 50M, 2B)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match[2].lower()]
    value = float(match[1]) * scale
    if not (math.isfinite(value) and value >= 1):
        raise UserError(f"a token count must be at least 1, got {text!r}")
    return int(value)


@dataclass
class TokenBudget:
    """Per-input token targets, enforced where documents are written (in input order)."""

    names: list[str]
    weights: list[float] | None
    max_tokens: int | None
    max_input_tokens: int | None
    tokens: list[int] = field(init=False)
    targets: list[float] = field(init=False)
    exhausted: int | None = None
    """The input whose end fixed a mixture's size (it ran out short of its share)."""
    closed: list[bool] = field(init=False)
    """Inputs that take no more documents."""

    def __post_init__(self) -> None:
        n = len(self.names)
        self.tokens, self.closed = [0] * n, [False] * n
        if self.weights is not None and self.max_tokens is not None:
            self.targets = [w * self.max_tokens for w in self.weights]
        else:
            self.targets = [math.inf] * n
        if self.max_input_tokens is not None:
            self.targets = [min(t, self.max_input_tokens) for t in self.targets]

    @property
    def active(self) -> bool:
        return (
            self.weights is not None
            or self.max_tokens is not None
            or self.max_input_tokens is not None
        )

    def copy(self) -> TokenBudget:
        """A fresh budget with the same settings (the tokenizer's own pass over the data)."""
        return TokenBudget(self.names, self.weights, self.max_tokens, self.max_input_tokens)

    def total_cap(self) -> int | None:
        """The tokens the output will hold at most, when that is known."""
        caps = [t for t in self.targets if math.isfinite(t)]
        if self.max_tokens is not None:
            return self.max_tokens
        return int(sum(caps)) if len(caps) == len(self.targets) else None

    def chars_to_read(self) -> int | None:
        """A bound on the characters a tokenizer is trained on when the output is capped:
        generous (8 characters per token), as no token has been counted yet."""
        cap = self.total_cap()
        return None if cap is None else 8 * cap

    def total(self) -> int:
        return sum(self.tokens)

    def full(self) -> bool:
        """No input takes more documents."""
        return all(self.closed)

    def admit(self, source: int, n_tokens: int) -> bool:
        """Write this document? Counts it if so; closes its input (or, under a total cap
        without weights, every input) at the first one that overshoots by more than half."""
        if self.closed[source]:
            return False
        if self.tokens[source] + n_tokens / 2 > self.targets[source]:
            self.closed[source] = True
            return False
        if (
            self.weights is None
            and self.max_tokens is not None
            and self.total() + n_tokens / 2 > self.max_tokens
        ):
            self.closed = [True] * len(self.closed)
            return False
        self.tokens[source] += n_tokens
        return True

    def input_ended(self, source: int) -> None:
        """Every document of input `source` has been seen by the writer. In a mixture, an
        input that ends short of its share fixes the others' targets from its exact total
        (an uncapped mixture ends so, with its first exhausted input)."""
        if self.closed[source]:
            return
        self.closed[source] = True
        if self.weights is None or self.exhausted is not None:
            return
        if self.tokens[source] + 0.5 >= self.targets[source]:
            return  # it had enough for its share
        self.exhausted = source
        final = self.tokens[source]
        self.targets = [
            min(t, final * w / self.weights[source])
            for t, w in zip(self.targets, self.weights, strict=True)
        ]
        for i, (tokens, target) in enumerate(zip(self.tokens, self.targets, strict=True)):
            if tokens >= target:
                self.closed[i] = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "closed": self.closed,
            "targets": [t if math.isfinite(t) else None for t in self.targets],
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens = list(state["tokens"])
        self.closed = list(state["closed"])
        self.targets = [math.inf if t is None else t for t in state["targets"]]
        self.exhausted = state["exhausted"]

    def report(self) -> list[dict[str, Any]]:
        total = max(1, self.total())
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"input": name, "tokens": self.tokens[i]}
            row["share"] = round(self.tokens[i] / total, 5)
            if self.weights is not None:
                row["weight"] = round(self.weights[i], 5)
            if math.isfinite(self.targets[i]):
                row["target_tokens"] = int(self.targets[i])
            rows.append(row)
        return rows


END = "end"
"""The split of the marker document that tells the writer an input has no more."""
SAMPLE_CHARS = 200_000
"""Characters of each input encoded up front to estimate its characters per token."""


class MixedDocuments:
    """The documents of several corpora, interleaved by their weights (see the module),
    each input's end marked by a Document(split=END). `position()` after a document says
    where reading stands; `start` (such a position) continues from there."""

    def __init__(
        self,
        corpora: list[Corpus],
        budget: TokenBudget,
        tokenizer=None,
        start: dict[str, Any] | None = None,
    ):
        self.corpora, self.budget = corpora, budget
        n = len(corpora)
        self.read_chars = list(start["read_chars"]) if start else [0] * n
        self.read_docs = list(start["read_docs"]) if start else [0] * n
        self.ended = list(start["ended"]) if start else [False] * n
        self.chars_per_token = [
            _sample_chars_per_token(c, tokenizer) if tokenizer is not None else 1.0 for c in corpora
        ]

    def position(self) -> dict[str, Any]:
        return {
            "read_chars": list(self.read_chars),
            "read_docs": list(self.read_docs),
            "ended": list(self.ended),
        }

    def _behind(self, i: int) -> float:
        """Estimated tokens read from input i over its weight."""
        weights = self.budget.weights
        assert weights is not None
        return self.read_chars[i] / self.chars_per_token[i] / weights[i]

    def __iter__(self) -> Iterator[Document]:
        budget = self.budget
        streams = [
            itertools.islice(c.documents(), skip, None)
            for c, skip in zip(self.corpora, self.read_docs, strict=True)
        ]
        active = [i for i in range(len(streams)) if not self.ended[i]]
        while active and not budget.full():
            active = [j for j in active if not budget.closed[j]]  # what no one will write
            if not active:
                return
            i = active[0] if budget.weights is None else min(active, key=self._behind)
            doc = next(streams[i], None)
            if doc is None:
                self.ended[i] = True
                active.remove(i)
                yield Document("", END, source=i)
                continue
            self.read_chars[i] += len(doc.text)
            self.read_docs[i] += 1
            yield Document(doc.text, doc.split, source=i)


def _sample_chars_per_token(corpus: Corpus, tokenizer) -> float:
    """Characters per token of the first SAMPLE_CHARS characters of an input."""
    texts, chars = [], 0
    for doc in corpus.documents():
        texts.append(doc.text)
        chars += len(doc.text)
        if chars >= SAMPLE_CHARS:
            break
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts)) if texts else 0
    return chars / tokens if tokens else 1.0
