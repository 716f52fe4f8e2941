"""FLOWROLL: pipe a short list of integers through operations.

    [3 1 4] | rot 1 | map *2 | sort => [2 6 8]
    [5 2 7 2] | filter odd | sum => 12

Syntax (canonical form: single spaces exactly as below, no leading/trailing space)::

    program := list ( " | " op )+
    list    := "[" ( int ( " " int )* )? "]"        ints may be negative: [-1 4]
    op      := "rot " K        rotate left by K (mod length)
             | "map +" K | "map -" K | "map *" K
             | "filter >" N | "filter <" N | "filter even" | "filter odd"
             | "sort"          ascending
             | "rev"
             | "take " K       first K elements
             | "drop " K       all but the first K elements
             | "sum"           list -> integer; only valid as the last operation

K is a non-negative integer; N may be negative. The parser also accepts any whitespace
between tokens (`map * 2`), which `format` normalises away. Results print as `[2 6 8]`,
`[]` or `17`. A list operation after `sum` parses, but the checker rejects it with
DSLTypeError. Difficulty is the number of operations; longer lists come with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmlab.data.dsl.common import DIFFICULTIES, DSLTypeError, Language, Scanner, choice, randint


@dataclass(frozen=True)
class Op:
    """One pipeline step: `name`, an operator `symbol` (map/filter) and an integer `arg`."""

    name: str
    symbol: str | None = None
    arg: int | None = None


@dataclass(frozen=True)
class Pipeline:
    """A FLOWROLL program: the input list and the operations applied to it in order."""

    values: tuple[int, ...]
    ops: tuple[Op, ...]


# Operation name -> what follows it: an integer K, an operator and K, or nothing.
_TAKES_COUNT = ("rot", "take", "drop")
_BARE = ("sort", "rev", "sum")
OPERATIONS = ("rot", "map", "filter", "sort", "rev", "take", "drop", "sum")

# Generator settings. Small values and multipliers keep every result a few tokens long:
# five `map *3` steps on a 9 give at most 2187.
_MAX_VALUE = 9
_SUM_PROBABILITY = 0.2  # chance that the last operation is `sum`
# map and filter are listed twice: they have the most variants worth seeing.
_GENERATED_OPS = ("rot", "map", "map", "filter", "filter", "sort", "rev", "take", "drop")


def _format_op(op: Op) -> str:
    if op.name in _BARE:
        return op.name
    if op.name in _TAKES_COUNT:
        return f"{op.name} {op.arg}"
    if op.arg is None:  # filter even / filter odd
        return f"{op.name} {op.symbol}"
    return f"{op.name} {op.symbol}{op.arg}"


def _format_value(value: list[int] | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "[" + " ".join(map(str, value)) + "]"


class FlowRoll(Language[Pipeline]):
    """The FLOWROLL language (see the module docstring for its syntax)."""

    name = "flowroll"
    difficulties = DIFFICULTIES

    # -- parsing and formatting ----------------------------------------------------------

    def parse(self, program: str) -> Pipeline:
        """Parse FLOWROLL text; raise DSLSyntaxError on malformed input."""
        s = Scanner(program)
        s.expect("[")
        values: list[int] = []
        while True:
            s.skip_spaces()
            if s.take("]"):
                break
            values.append(s.integer(signed=True))
            # Numbers must be separated: "[3-1]" is a typo, not the list [3 -1].
            if not (s.peek().isspace() or s.peek() == "]"):
                raise s.error("expected a space or ']' after a number")
        ops: list[Op] = []
        while not s.at_end():
            s.expect("|")
            ops.append(self._parse_op(s))
        if not ops:
            raise s.error("expected at least one operation such as '| sort'")
        return Pipeline(tuple(values), tuple(ops))

    def _parse_op(self, s: Scanner) -> Op:
        s.skip_spaces()
        start = s.pos
        name = s.word()
        if name not in OPERATIONS:
            raise s.error(f"expected an operation ({', '.join(OPERATIONS)})", start)
        if name in _BARE:
            return Op(name)
        s.skip_spaces()
        if name in _TAKES_COUNT:
            return Op(name, arg=s.integer())
        if name == "map":
            symbol = next((c for c in "+-*" if s.take(c)), None)
            if symbol is None:
                raise s.error("expected '+', '-' or '*' after 'map'")
            s.skip_spaces()
            return Op(name, symbol, s.integer())
        # filter
        symbol = next((c for c in "><" if s.take(c)), None)
        if symbol is not None:
            s.skip_spaces()
            return Op(name, symbol, s.integer(signed=True))
        word_start = s.pos
        word = s.word()
        if word not in ("even", "odd"):
            raise s.error("expected '>', '<', 'even' or 'odd' after 'filter'", word_start)
        return Op(name, word)

    def format(self, tree: Pipeline) -> str:
        """Canonical text: `[3 1 4] | rot 1 | map *2`."""
        return " | ".join([_format_value(list(tree.values)), *map(_format_op, tree.ops)])

    # -- checking and running ------------------------------------------------------------

    def check(self, tree: Pipeline) -> None:
        """Raise DSLTypeError if an operation receives an integer (anything after `sum`)."""
        for index, op in enumerate(tree.ops[:-1]):
            if op.name == "sum":
                following = _format_op(tree.ops[index + 1])
                raise DSLTypeError(
                    f"'{following}' needs a list but gets the integer from 'sum' "
                    f"(operation {index + 2}); 'sum' may only be the last operation"
                )

    def evaluate(self, tree: Pipeline) -> str:
        """Canonical result, e.g. `[2 6 8]`, `[]` or `17`."""
        self.check(tree)
        values = list(tree.values)
        for op in tree.ops:
            if op.name == "sum":
                return str(sum(values))  # the checker made sure it is the last op
            values = _apply(op, values)
        return _format_value(values)

    def difficulty(self, tree: Pipeline) -> int:
        """Number of operations."""
        return len(tree.ops)

    # -- generation ----------------------------------------------------------------------

    def generate(self, rng: random.Random, difficulty: int) -> Pipeline:
        """A random well-typed pipeline with `difficulty` operations (lists grow with it)."""
        length = randint(rng, 2, 3 + difficulty)
        values = tuple(randint(rng, 0, _MAX_VALUE) for _ in range(length))
        ops = [_random_list_op(rng) for _ in range(difficulty)]
        if rng.random() < _SUM_PROBABILITY:
            ops[-1] = Op("sum")
        return Pipeline(values, tuple(ops))


def _apply(op: Op, values: list[int]) -> list[int]:
    """Apply one list -> list operation."""
    k = 0 if op.arg is None else op.arg  # unused by sort, rev and filter even/odd
    if op.name == "rot":
        k = k % len(values) if values else 0
        return values[k:] + values[:k]
    if op.name == "map":
        if op.symbol == "+":
            return [x + k for x in values]
        if op.symbol == "-":
            return [x - k for x in values]
        return [x * k for x in values]
    if op.name == "filter":
        if op.symbol == ">":
            return [x for x in values if x > k]
        if op.symbol == "<":
            return [x for x in values if x < k]
        remainder = 0 if op.symbol == "even" else 1
        return [x for x in values if x % 2 == remainder]
    if op.name == "sort":
        return sorted(values)
    if op.name == "rev":
        return values[::-1]
    if op.name == "take":
        return values[:k]
    if op.name == "drop":
        return values[k:]
    raise AssertionError(f"unhandled operation {op.name!r}")


def _random_list_op(rng: random.Random) -> Op:
    name = choice(rng, _GENERATED_OPS)
    if name == "rot":
        return Op(name, arg=randint(rng, 1, 3))
    if name == "take":
        return Op(name, arg=randint(rng, 1, 4))
    if name == "drop":
        return Op(name, arg=randint(rng, 1, 3))
    if name == "map":
        symbol = choice(rng, "+-*")
        # Multipliers stay small so numbers stay short after several steps.
        return Op(name, symbol, randint(rng, 2, 3) if symbol == "*" else randint(rng, 1, 9))
    if name == "filter":
        symbol = choice(rng, (">", "<", "even", "odd"))
        if symbol in ("even", "odd"):
            return Op(name, symbol)
        return Op(name, symbol, randint(rng, 0, _MAX_VALUE))
    return Op(name)


FLOWROLL = FlowRoll()
"""The FLOWROLL language instance (stateless; use `get_language("flowroll")`)."""
