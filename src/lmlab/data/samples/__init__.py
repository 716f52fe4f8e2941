"""Sample text shipped with lmlab, so demos train on real language with no download.

shakespeare.txt   the first 250 KB of the plays in the widely used tinyshakespeare
                  corpus (public domain): a small "general text" for a base model
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent


def sample_path(name: str = "shakespeare.txt") -> Path:
    """The path of a shipped sample text."""
    return SAMPLES / name
