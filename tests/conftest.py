"""Shared fixtures: small corpora written by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Training picks its CPU threads from the machine's load unless told not to; runs that tests
# compare with each other must use the same count, so the suite (and every lmlab process it
# starts) keeps torch's default. tests/train/test_cpu_threads.py turns it back on.
os.environ["LMLAB_CPU_AUTO"] = "0"

MIXED_TEXT = [
    "The quick brown fox jumps over the lazy dog.\n\nA second paragraph, with numbers 1234.\n",
    "Ünïcödé: naïve café, smörgåsbord, Ελληνικά, русский, 日本語のテキスト, emoji 🦊🚀.\n\n  indented\tline\n",
    "Code: def f(x):\n    return x ** 2  # comment\n\n\n\nTrailing blank lines\n\n",
    "Short.",
]


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A folder of text files (nested, non-ASCII) and a JSONL file."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, text in enumerate(MIXED_TEXT):
        folder = root / "sub" if i % 2 else root
        (folder / f"doc{i}.txt").write_text(text * 5, encoding="utf-8")
    (root / "notes.md").write_text("# Title\n\nSome *markdown* text.\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def flowroll_data(tmp_path_factory) -> Path:
    """A small prepared FLOWROLL data directory (char-level), shared by the session."""
    from lmlab.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "flowroll"
    prepare(["dsl:flowroll:3000"], out, "char", log=lambda *_: None)
    return out
