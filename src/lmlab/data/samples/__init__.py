"""Sample text shipped with lmlab, so demos train on real language with no download.

shakespeare.txt   the widely used tinyshakespeare corpus (1.1 MB of the plays, public
                  domain): a small "general text" for a base model;
                  `lmlab prepare --input sample:shakespeare` reads it
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent


def sample_names() -> list[str]:
    """The shipped samples, as `lmlab prepare --input sample:NAME` names them."""
    return sorted(p.stem for p in SAMPLES.glob("*.txt"))


def sample_path(name: str = "shakespeare.txt") -> Path:
    """The path of a shipped sample text."""
    return SAMPLES / name
