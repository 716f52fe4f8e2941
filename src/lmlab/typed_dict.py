"""Build typed dataclasses from plain dicts (YAML, JSON, command-line overrides).

One place for the rules every config section follows: unknown keys are refused with a
did-you-mean, values read as text are converted to the field's type, and a wrong type is
a one-line UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from lmlab.errors import UserError

T = TypeVar("T")


def suggest(key: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' when a known name is close to `key`, else ''."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type[T], d: Mapping[str, Any], section: str) -> T:
    """`cls(**d)` with unknown keys refused and text values converted to the field types."""
    if not isinstance(d, Mapping):
        raise UserError(f"{section} config must be a mapping of keys to values, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in hints:
            raise UserError(f"unknown {section} config key {key!r}{suggest(key, known)}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in d]
    if missing:
        raise UserError(f"{section} config is missing required key(s): {', '.join(missing)}")
    return cls(**{key: coerce(f"{section}.{key}", value, hints[key]) for key, value in d.items()})


def coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a value read from text to the field's type; check Literal choices."""
    if value is None:
        return value
    allowed = (
        set(typing.get_args(hint))
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else {hint}
    )
    literals = [a for a in allowed if typing.get_origin(a) is typing.Literal]
    if literals:
        choices = [c for lit in literals for c in typing.get_args(lit)]
        if value not in choices:
            raise UserError(
                f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}{suggest(str(value), [str(c) for c in choices])}"
            )
        return value
    if isinstance(value, bool):
        if bool in allowed:
            return value
        raise UserError(f"{name} must be {_describe(allowed)}, got {value!r}")
    try:
        if int in allowed and isinstance(value, (str, float)):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, float) else int(value.replace("_", ""))
        if float in allowed and isinstance(value, (str, int)):
            return float(value)
        if bool in allowed and isinstance(value, str):
            if value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if str in allowed and not isinstance(value, str):
            raise ValueError
    except ValueError:
        raise UserError(f"{name} must be {_describe(allowed)}, got {value!r}") from None
    return value


def _describe(allowed: set) -> str:
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return " or ".join(kind[t] for t in kind if t in allowed) or "valid"
