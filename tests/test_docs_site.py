"""The documentation site: the CLI reference matches the commands, and mkdocs builds it."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference" / "cli.md"
REGENERATE = "python docs/gen_cli_reference.py"


def _generator():
    """docs/gen_cli_reference.py, a script rather than a module of the package."""
    spec = importlib.util.spec_from_file_location(
        "gen_cli_reference", ROOT / "docs" / "gen_cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    gen = _generator()
    committed = REFERENCE.read_text(encoding="utf-8")
    recorded = gen.recorded_python_version(committed)
    if recorded != gen.python_version():
        pytest.skip(
            f"docs/reference/cli.md was generated with Python {recorded}; argparse lays "
            f"out help differently in {gen.python_version()}"
        )
    assert gen.render() == committed, (
        f"docs/reference/cli.md differs from the commands' --help: run `{REGENERATE}`"
    )


def test_every_command_is_in_the_reference():
    text = REFERENCE.read_text(encoding="utf-8")
    assert "## lmlab\n" in text  # the top-level `lmlab --help`
    for name in COMMANDS:
        assert f"\n## lmlab {name}\n" in text, f"lmlab {name} is missing: run `{REGENERATE}`"
        assert f"usage: lmlab {name}" in text, (
            f"lmlab {name} has no --help output in the reference: run `{REGENERATE}`"
        )


def test_the_reference_lists_subcommands():
    text = REFERENCE.read_text(encoding="utf-8")
    for prog in ("lmlab runs list", "lmlab dsl generate", "lmlab lora merge", "lmlab plan api"):
        assert f"\n### {prog}\n" in text
        assert f"usage: {prog}" in text


@pytest.mark.slow
def test_mkdocs_build_strict_passes(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


def test_experiments_page_shows_a_full_run_of_every_experiment():
    """docs/experiments.md, generated from full runs: each experiment's section names the
    command it ran (without --quick) and the commit, and every plot it shows exists."""
    from lmlab.experiments.common import EXPERIMENTS

    text = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    for name in EXPERIMENTS:
        assert f"\n## {name}\n" in text, (
            f"docs/experiments.md has no full run of {name}: see docs/gen_experiments_doc.py"
        )
        body = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert f"Run with `lmlab experiment {name}` (lmlab" in body and "commit " in body
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body)
        assert images, f"the {name} section shows no plot"
        for image in images:
            assert image.startswith(f"images/experiments/{name}/")
            assert (ROOT / "docs" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
