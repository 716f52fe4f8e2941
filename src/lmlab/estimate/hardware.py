"""Hardware presets (memory, dense peak FLOP/s, example price) and specs like `4xH20`.

The presets live in hardware.yaml next to this file; a user file with the same layout
(`hardware: {name: {...}}`) can be passed instead. Prices there are examples, never facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from lmlab.config import TRAINING_DTYPES
from lmlab.errors import UserError
from lmlab.typed_dict import suggest


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU) model."""

    name: str
    description: str
    memory_gib: float
    """Vendor memory size of one device."""
    peak_flops: float | None
    """Dense (non-sparse) bf16/fp16 tensor peak of one device in FLOP/s; None if unknown."""
    precision: str
    """Training precision the planner assumes on it: "bf16", "fp16" or "fp32"."""
    example_price_usd_per_hour: float | None
    """An EXAMPLE hourly price of one device; see price_note."""
    price_note: str


def _parse(data: object, source: str) -> dict[str, Hardware]:
    if not isinstance(data, dict) or not isinstance(data.get("hardware"), dict):
        raise UserError(f"{source}: expected a mapping with a 'hardware:' section")
    out = {}
    for name, spec in data["hardware"].items():
        if not isinstance(spec, dict) or "memory_gib" not in spec:
            raise UserError(f"{source}: hardware {name!r} needs at least memory_gib")
        try:
            peak = spec.get("peak_flops")
            price = spec.get("example_price_usd_per_hour")
            out[str(name).lower()] = Hardware(
                name=str(name).lower(),
                description=str(spec.get("description", name)),
                memory_gib=float(spec["memory_gib"]),
                peak_flops=None if peak is None else float(peak),
                precision=str(spec.get("precision", "bf16")),
                example_price_usd_per_hour=None if price is None else float(price),
                price_note=str(spec.get("price_note", "")),
            )
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: hardware {name!r} has a bad number: {e}") from None
        if out[str(name).lower()].precision not in TRAINING_DTYPES:
            raise UserError(
                f"{source}: hardware {name!r}: precision must be one of {', '.join(TRAINING_DTYPES)}"
            )
    return out


def load_hardware(path: str | Path | None = None) -> dict[str, Hardware]:
    """The built-in presets, or those of a user YAML file."""
    if path is None:
        text = resources.files("lmlab.estimate").joinpath("hardware.yaml").read_text()
        return _parse(yaml.safe_load(text), "hardware.yaml")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read hardware file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"hardware file {path} is not valid YAML: {e}") from None
    return _parse(data, str(path))


# More accelerators than any cluster holds: a typo (or a test of the limits), not a plan.
MAX_DEVICES = 1_000_000
_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?([a-z0-9][a-z0-9_.-]*)\s*$")


def parse_hardware_spec(
    spec: str, presets: dict[str, Hardware] | None = None
) -> tuple[int, Hardware]:
    """`"4xH20"` -> (4, the h20 preset); `"h100"` -> (1, h100). Case-insensitive."""
    presets = load_hardware() if presets is None else presets
    match = _SPEC.match(spec.lower())
    if not match:
        raise UserError(f"cannot read hardware {spec!r}; write e.g. 'h100' or '4xH20'")
    count = int(match.group(1) or 1)
    name = match.group(2)
    if not 1 <= count <= MAX_DEVICES:
        raise UserError(f"hardware count must be between 1 and {MAX_DEVICES:,}, got {spec!r}")
    if name not in presets:
        raise UserError(
            f"unknown hardware {name!r}{suggest(name, list(presets))}; "
            f"known: {', '.join(presets)} (or pass --hardware-file)"
        )
    return count, presets[name]
