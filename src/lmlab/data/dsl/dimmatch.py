"""DIMMATCH: compute the shape of a tensor expression, or say where it breaks.

    matmul(2x3, transpose(4x3, 1 0)) => 2x4
    cat(broadcast(2x1x5, 3x5), 2x3x5, 0) => 4x3x5
    matmul(transpose(2x3, 1 0), 4x5) => error: matmul(3x2, 4x5)

Syntax (canonical form: exactly this spacing, ", " between arguments)::

    expr := shape
          | "matmul(" expr ", " expr ")"         batched matrix product
          | "broadcast(" expr ", " expr ")"      elementwise broadcast
          | "cat(" expr ", " expr ", " AXIS ")"  concatenate along AXIS
          | "reshape(" expr ", " shape ")"       same number of elements
          | "transpose(" expr ", " PERM ")"      PERM: space-separated axes, "2 0 1"
    shape := DIM ( "x" DIM )*                    DIM >= 1, rank >= 1: "5", "2x3x4"

Rules follow numpy. broadcast aligns shapes from the right; each pair of dims must be
equal or contain a 1. matmul needs rank >= 2 on both sides and a[-1] == b[-2]; the batch
dims a[:-2] and b[:-2] broadcast, giving batch + (a[-2], b[-1]). cat needs equal ranks,
0 <= AXIS < rank and equal dims off the axis. reshape needs equal element counts.
transpose needs a permutation of 0..rank-1 and gives shape[PERM[0]] x shape[PERM[1]] ...

A shape mismatch is a result, not an exception: `error: CALL`, where CALL is the first
failing call (arguments are evaluated left to right, innermost first) written with its
tensor arguments replaced by their shapes, so it is itself a canonical DIMMATCH program.
The parser also accepts any whitespace between tokens (not inside a shape); `format`
normalises it. Difficulty is the number of operations; the generator's maximum rank grows
with it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lmlab.data.dsl.common import DIFFICULTIES, Language, Scanner, choice, randint


@dataclass(frozen=True)
class Shape:
    """A literal tensor shape, e.g. (2, 3) for `2x3`."""

    dims: tuple[int, ...]


@dataclass(frozen=True)
class Call:
    """An operation on tensor expressions; `param` is cat's axis, reshape's target shape or
    transpose's permutation (None for matmul and broadcast)."""

    op: str
    operands: tuple[Shape | Call, ...]
    param: int | tuple[int, ...] | None = None


Expr = Shape | Call

OPERATIONS = ("matmul", "broadcast", "cat", "reshape", "transpose")

# Deeper nesting than this is surely not a practice program; stopping early also keeps
# Python's recursion limit out of the picture.
_MAX_DEPTH = 64

# Generator settings.
_MAX_DIM = 8
_ERROR_PROBABILITY = 0.3  # chance that one shape, axis or permutation is perturbed


def _max_rank(difficulty: int) -> int:
    # 3, 3, 4, 4, 4 for difficulties 1..5: rank 3 already at level 1 keeps enough distinct
    # one-operation programs for the 5% val and test splits.
    return min(4, 3 + (difficulty - 1) // 2)


def _random_dim(rng: random.Random) -> int:
    # Mostly 2.._MAX_DIM: 1s broadcast against anything, so a shape full of them tests little.
    return 1 if rng.random() < 0.1 else randint(rng, 2, _MAX_DIM)


def _format_dims(dims: tuple[int, ...]) -> str:
    return "x".join(map(str, dims))


class DimMatch(Language[Expr]):
    """The DIMMATCH language (see the module docstring for its syntax and rules)."""

    name = "dimmatch"
    difficulties = DIFFICULTIES

    # -- parsing and formatting ----------------------------------------------------------

    def parse(self, program: str) -> Expr:
        """Parse DIMMATCH text; raise DSLSyntaxError on malformed input."""
        s = Scanner(program)
        expr = self._parse_expr(s, depth=0)
        if not s.at_end():
            raise s.error("expected end of program")
        return expr

    def _parse_expr(self, s: Scanner, depth: int) -> Expr:
        s.skip_spaces()
        if depth > _MAX_DEPTH:
            raise s.error(f"expressions may nest at most {_MAX_DEPTH} deep")
        if s.peek().isdigit():
            return Shape(self._parse_dims(s))
        start = s.pos
        op = s.word()
        if op not in OPERATIONS:
            raise s.error(
                f"expected a shape like 2x3 or an operation ({', '.join(OPERATIONS)})", start
            )
        s.expect("(")
        first = self._parse_expr(s, depth + 1)
        s.expect(",")
        s.skip_spaces()
        if op == "reshape":
            call = Call(op, (first,), self._parse_dims(s))
        elif op == "transpose":
            perm = [s.integer()]
            s.skip_spaces()
            while s.peek().isdigit():
                perm.append(s.integer())
                s.skip_spaces()
            call = Call(op, (first,), tuple(perm))
        else:
            second = self._parse_expr(s, depth + 1)
            if op == "cat":
                s.expect(",")
                s.skip_spaces()
                call = Call(op, (first, second), s.integer())
            else:
                call = Call(op, (first, second))
        s.expect(")")
        return call

    def _parse_dims(self, s: Scanner) -> tuple[int, ...]:
        dims = []
        while True:
            start = s.pos
            dim = s.integer()
            if dim < 1:
                raise s.error("dimensions must be at least 1", start)
            dims.append(dim)
            if not s.take("x"):
                return tuple(dims)

    def format(self, tree: Expr) -> str:
        """Canonical text: `matmul(2x3, transpose(4x3, 1 0))`."""
        if isinstance(tree, Shape):
            return _format_dims(tree.dims)
        args = [self.format(operand) for operand in tree.operands]
        if isinstance(tree.param, int):
            args.append(str(tree.param))
        elif tree.op == "reshape" and tree.param is not None:
            args.append(_format_dims(tree.param))
        elif tree.param is not None:
            args.append(" ".join(map(str, tree.param)))
        return f"{tree.op}({', '.join(args)})"

    # -- running -------------------------------------------------------------------------

    def evaluate(self, tree: Expr) -> str:
        """Canonical result: a shape like `2x4`, or `error: CALL` for the first mismatch."""
        try:
            return _format_dims(_shape_of(tree))
        except _Mismatch as mismatch:
            return "error: " + self.format(mismatch.call)

    def difficulty(self, tree: Expr) -> int:
        """Number of operations."""
        if isinstance(tree, Shape):
            return 0
        return 1 + sum(self.difficulty(operand) for operand in tree.operands)

    # -- generation ----------------------------------------------------------------------

    def generate(self, rng: random.Random, difficulty: int) -> Expr:
        """A random expression with `difficulty` operations.

        Built top-down from a target shape so that most programs are consistent; then, with
        probability 0.3, one shape, axis or permutation is perturbed so that errors (the
        interesting cases) are common without drowning out the valid ones.
        """
        max_rank = _max_rank(difficulty)
        target = tuple(_random_dim(rng) for _ in range(randint(rng, 1, max_rank)))
        tree = _build(rng, difficulty, target, max_rank)
        if rng.random() < _ERROR_PROBABILITY:
            tree = _perturb(rng, tree)
        return tree


# ---------------------------------------------------------------------------------------
# Shape rules. Each returns the result shape, or None when the arguments do not fit.


class _Mismatch(Exception):
    """Carries the first failing call, with its arguments evaluated to shapes."""

    def __init__(self, call: Call) -> None:
        super().__init__()
        self.call = call


def _shape_of(expr: Expr) -> tuple[int, ...]:
    if isinstance(expr, Shape):
        return expr.dims
    shapes = [_shape_of(operand) for operand in expr.operands]
    result = _apply(expr.op, shapes, expr.param)
    if result is None:
        raise _Mismatch(Call(expr.op, tuple(Shape(s) for s in shapes), expr.param))
    return result


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        # Shapes align from the right; a missing leading dim acts as 1.
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da != db and 1 not in (da, db):
            return None
        out.append(max(da, db))
    return tuple(reversed(out))


def _apply(
    op: str, shapes: list[tuple[int, ...]], param: int | tuple[int, ...] | None
) -> tuple[int, ...] | None:
    if op == "broadcast":
        return _broadcast(shapes[0], shapes[1])
    if op == "matmul":
        a, b = shapes
        if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
            return None
        batch = _broadcast(a[:-2], b[:-2])
        return None if batch is None else (*batch, a[-2], b[-1])
    if op == "cat":
        a, b = shapes
        assert isinstance(param, int)
        if len(a) != len(b) or param >= len(a):
            return None
        if any(a[i] != b[i] for i in range(len(a)) if i != param):
            return None
        return tuple(a[i] + b[i] if i == param else a[i] for i in range(len(a)))
    if op == "reshape":
        assert isinstance(param, tuple)
        return param if math.prod(shapes[0]) == math.prod(param) else None
    if op == "transpose":
        assert isinstance(param, tuple)
        (a,) = shapes
        if sorted(param) != list(range(len(a))):
            return None
        return tuple(a[axis] for axis in param)
    raise AssertionError(f"unhandled operation {op!r}")


# ---------------------------------------------------------------------------------------
# Generation


def _build(rng: random.Random, ops: int, target: tuple[int, ...], max_rank: int) -> Expr:
    """An expression with exactly `ops` operations whose shape is `target`."""
    if ops == 0:
        return Shape(target)
    rank = len(target)
    choices = ["broadcast"]
    if rank >= 2 or len(_prime_factors(math.prod(target))) >= 2:  # another shape exists
        choices.append("reshape")
    if rank >= 2:
        choices += ["matmul", "transpose"]
    if any(dim >= 2 for dim in target):
        choices.append("cat")
    op = choice(rng, choices)
    rest = ops - 1

    if op == "reshape":
        return Call(
            op, (_build(rng, rest, _reshape_source(rng, target, max_rank), max_rank),), target
        )
    if op == "transpose":
        perm = list(range(rank))
        while perm == sorted(perm):  # the identity teaches nothing
            rng.shuffle(perm)
        source = [0] * rank
        for out_axis, in_axis in enumerate(perm):
            source[in_axis] = target[out_axis]
        return Call(op, (_build(rng, rest, tuple(source), max_rank),), tuple(perm))

    if op == "broadcast":
        a, b = _broadcast_sources(rng, target, min_rank=1)
        param = None
    elif op == "matmul":
        k = _random_dim(rng)
        batch_a, batch_b = _broadcast_sources(rng, target[:-2], min_rank=0)
        a, b = (*batch_a, target[-2], k), (*batch_b, k, target[-1])
        param = None
    else:  # cat
        axis = choice(rng, [i for i, dim in enumerate(target) if dim >= 2])
        left = randint(rng, 1, target[axis] - 1)
        a = target[:axis] + (left,) + target[axis + 1 :]
        b = target[:axis] + (target[axis] - left,) + target[axis + 1 :]
        param = axis
    left_ops = randint(rng, 0, rest)
    operands = (_build(rng, left_ops, a, max_rank), _build(rng, rest - left_ops, b, max_rank))
    return Call(op, operands, param)


def _broadcast_sources(
    rng: random.Random, target: tuple[int, ...], min_rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two shapes that broadcast to `target`: some dims set to 1, maybe leading dims cut."""
    a, b = [], []
    for dim in target:
        r = rng.random()
        if dim == 1 or r < 0.6:
            a.append(dim)
            b.append(dim)
        elif r < 0.8:
            a.append(1)
            b.append(dim)
        else:
            a.append(dim)
            b.append(1)
    if rng.random() < 0.4:
        short, full = (a, b) if rng.random() < 0.5 else (b, a)
        # A leading dim may be dropped only where the other side still carries it.
        droppable = 0
        while droppable < len(target) - min_rank and full[droppable] == target[droppable]:
            droppable += 1
        del short[: randint(rng, 0, droppable)]
    return tuple(a), tuple(b)


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _reshape_source(rng: random.Random, target: tuple[int, ...], max_rank: int) -> tuple[int, ...]:
    """A different shape with as many elements as `target` (which must have one)."""
    count = math.prod(target)
    factors = _prime_factors(count)
    if not factors:  # all dims are 1
        return (1,)
    for _ in range(4):
        rng.shuffle(factors)
        # One prime per dim first, so no dim is 1; the rest land anywhere.
        rank = randint(rng, 1, min(max_rank, len(factors)))
        dims = factors[:rank]
        for factor in factors[rank:]:
            dims[randint(rng, 0, rank - 1)] *= factor
        if tuple(dims) != target:
            return tuple(dims)
    return (count,) if len(target) > 1 else (factors[0], count // factors[0])


def _perturb(rng: random.Random, tree: Expr) -> Expr:
    """`tree` with one shape dim, reshape dim, cat axis or permutation changed at random."""
    # Every node with its path (operand indices from the root), in preorder.
    nodes: list[tuple[tuple[int, ...], Expr]] = []
    stack: list[tuple[tuple[int, ...], Expr]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        nodes.append((path, node))
        if isinstance(node, Call):
            stack.extend(((*path, i), operand) for i, operand in enumerate(node.operands))
    path, victim = choice(rng, nodes)
    return _replace(tree, path, _perturbed(rng, victim))


def _other_value(rng: random.Random, value: int, low: int, high: int) -> int:
    new = randint(rng, low, high - 1)
    return new + 1 if new >= value else new  # uniform over [low, high] without `value`


def _perturbed(rng: random.Random, node: Expr) -> Expr:
    if isinstance(node, Shape):
        i = randint(rng, 0, len(node.dims) - 1)
        dims = list(node.dims)
        dims[i] = _other_value(rng, dims[i], 1, _MAX_DIM)
        return Shape(tuple(dims))
    if node.op == "cat":
        assert isinstance(node.param, int)
        return Call(node.op, node.operands, _other_value(rng, node.param, 0, node.param + 1))
    if node.op == "reshape":
        assert isinstance(node.param, tuple)
        dims = list(node.param)
        i = randint(rng, 0, len(dims) - 1)
        dims[i] = _other_value(rng, dims[i], 1, max(_MAX_DIM, dims[i]))
        return Call(node.op, node.operands, tuple(dims))
    if node.op == "transpose":
        assert isinstance(node.param, tuple)
        perm = list(node.param)
        i = randint(rng, 0, len(perm) - 1)
        perm[i] = _other_value(rng, perm[i], 0, len(perm))  # a repeated or too-large axis
        return Call(node.op, node.operands, tuple(perm))
    # matmul / broadcast carry nothing to perturb: perturb an operand instead.
    return _replace(node, (0,), _perturbed(rng, node.operands[0]))


def _replace(tree: Expr, path: tuple[int, ...], new: Expr) -> Expr:
    """`tree` with the node at `path` (operand indices from the root) replaced by `new`."""
    if not path:
        return new
    assert isinstance(tree, Call)
    operands = list(tree.operands)
    operands[path[0]] = _replace(operands[path[0]], path[1:], new)
    return Call(tree.op, tuple(operands), tree.param)


DIMMATCH = DimMatch()
"""The DIMMATCH language instance (stateless; use `get_language("dimmatch")`)."""
