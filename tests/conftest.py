"""Shared fixtures: small corpora written by the tests themselves."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

# Training picks its CPU threads from the machine's load unless told not to; runs that tests
# compare with each other must use the same count, so the suite (and every lmlab process it
# starts) keeps torch's default. tests/train/test_cpu_threads.py turns it back on.
os.environ["LMLAB_CPU_AUTO"] = "0"

POSIX_ONLY = (
    "needs a POSIX system (signals, process groups, fcntl locks, /proc); see docs/windows.md"
)
_MODULE_MARKED_POSIX = re.compile(r"^pytestmark\s*=.*\bpytest\.mark\.posix\b", re.MULTILINE)


def _on_windows() -> bool:
    return sys.platform == "win32"


class _PosixOnlyModule(pytest.Module):
    """A test module marked `posix` as a whole, seen on Windows: reported as skipped without
    being imported, because its module-level code may need what Windows lacks
    (`signal.SIGKILL` in a parametrize list, `import pty`)."""

    def collect(self):
        pytest.skip(f"{self.path.name} {POSIX_ONLY}")


def pytest_pycollect_makemodule(module_path: Path, parent):
    if _on_windows() and _MODULE_MARKED_POSIX.search(module_path.read_text(encoding="utf-8")):
        return _PosixOnlyModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """On Windows, skip the tests marked `posix` (the marker is registered in pyproject.toml)."""
    if not _on_windows():
        return
    skip = pytest.mark.skip(reason=POSIX_ONLY)
    for item in items:
        if "posix" in item.keywords:
            item.add_marker(skip)


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
