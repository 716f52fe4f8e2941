"""The files an open-source project carries (contributing guide, security policy, CI
workflow, Dockerfiles, Makefile, ...) exist, say lmlab-specific things, and agree with the
README and the code they describe."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
THREE_OSES = {"ubuntu-latest", "macos-latest", "windows-latest"}

# Each file, and phrases that only a file written for lmlab would contain.
REQUIRED = {
    "CONTRIBUTING.md": [
        'python -m pytest -m "not gpu"',
        "python -m pytest -m gpu",
        "bash .ci/run",
        "ruff check src tests benchmarks",
        "src/lmlab/model",
        "src/lmlab/data/dsl",
        "src/lmlab/eval",
        "tests/model/test_hf_parity.py",
        "BENCHMARKS.md",
        "pip install torch==2.13.0",
    ],
    "CODE_OF_CONDUCT.md": ["SECURITY.md", "Report a vulnerability", "BENCHMARKS.md"],
    "SECURITY.md": [
        "0.1.x",
        "Report a vulnerability",
        "weights_only=True",
        "safetensors",
        "HF_TOKEN",
        "SHA-256",
        "src/lmlab/fileio.py",
    ],
    "CHANGELOG.md": [
        "## [0.1.0]",
        "FLOWROLL",
        "DIMMATCH",
        "ZeRO-1",
        "FSDP2",
        "lmlab export",
        "lmlab publish",
        "DPO",
    ],
    ".env.example": ["HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME", "CUDA_VISIBLE_DEVICES"],
    ".github/ISSUE_TEMPLATE/bug_report.md": ["lmlab doctor --json", "SECURITY.md"],
    ".github/ISSUE_TEMPLATE/feature_request.md": ["lmlab doctor --json", "CONTRIBUTING.md"],
    ".github/pull_request_template.md": ['python -m pytest -m "not gpu"', "BENCHMARKS.md"],
    ".github/workflows/ci.yml": ["bash .ci/wheel-check", "mkdocs build --strict"],
    "docs/windows.md": ["WSL2", "fcntl", "os.fchmod", "posix", "tests/conftest.py"],
    "docs/containers.md": ["docker build -t lmlab .", "--gpus all", "have not been built"],
    "Dockerfile": ["python:3.11-slim", "lmlab", "quickstart"],
    "Dockerfile.cuda": ["nvidia/cuda", "--index-url"],
    ".dockerignore": [".venv", ".ci-venv", "runs", "quickstart"],
    "Makefile": ["pytest", "ruff", "mkdocs build --strict", "lmlab bench"],
}


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_project_file_exists_and_is_about_lmlab(name: str):
    text = read(name)
    missing = [phrase for phrase in REQUIRED[name] if phrase not in text]
    assert not missing, f"{name} lacks {missing}"
    assert ".invalid" not in text and "example.com" not in text, f"{name} has a placeholder"


# -- install commands: the README's, the Dockerfiles', CI's ----------------------------------

# pip options that take a value; -e/--editable takes the requirement itself.
_VALUE_OPTIONS = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-f",
    "--find-links",
}


def pip_requirements(text: str) -> list[str]:
    """The requirements of every `pip install` in shell text (options and their values
    dropped; `-e X` gives X)."""
    text = text.replace("\\\n", " ")
    found = []
    for segment in re.split(r"&&|;|\n|\|\|", text):
        match = re.search(r"\bpip install\b(.*)", segment)
        if not match:
            continue
        words = shlex.split(match.group(1), comments=True)
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in _VALUE_OPTIONS:
                skip = True
            elif word in ("-e", "--editable") or word.startswith("-"):
                continue
            else:
                found.append(word)
    return found


def torch_pins(requirements: list[str]) -> set[str]:
    return {r for r in requirements if re.match(r"torch\b", r)}


def lmlab_extras(requirements: list[str]) -> list[set[str]]:
    """The extras of each install of lmlab from a source tree (`.[dev]`, `/opt/lmlab[dev]`)."""
    out = []
    for r in requirements:
        match = re.fullmatch(r"(\.|/[\w/.-]*)\[([\w,\s-]+)\]", r)
        if match:
            out.append({e.strip() for e in match.group(2).split(",")})
    return out


def readme_install() -> tuple[set[str], set[str]]:
    lines = [line for line in read("README.md").splitlines() if "pip install torch==" in line]
    assert lines, "README.md has no install command with a torch pin"
    requirements = pip_requirements(lines[0])
    (extras,) = lmlab_extras(requirements)
    pins = torch_pins(requirements)
    assert len(pins) == 1, pins
    return pins, extras


def test_pip_requirement_parser():
    text = (
        "python3 -m venv .venv && pip install torch==2.13.0 && pip install -e '.[dev]'\n"
        "RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX} \\\n    && pip install '/opt/x[a, b]'"
    )
    assert pip_requirements(text) == ["torch==2.13.0", ".[dev]", "torch==2.13.0", "/opt/x[a, b]"]
    assert lmlab_extras(pip_requirements(text)) == [{"dev"}, {"a", "b"}]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_what_the_readme_installs(dockerfile: str):
    pins, extras = readme_install()
    run_lines = "\n".join(
        line
        for line in read(dockerfile).replace("\\\n", " ").splitlines()
        if line.startswith("RUN")
    )
    requirements = pip_requirements(run_lines)
    assert torch_pins(requirements) == pins, f"{dockerfile} installs another torch than README"
    assert lmlab_extras(requirements) == [extras], f"{dockerfile} installs other lmlab extras"


@pytest.mark.parametrize("name", [".ci/run", ".github/workflows/ci.yml", "Makefile"])
def test_ci_and_make_install_the_readme_torch_and_extras(name: str):
    pins, extras = readme_install()
    requirements = pip_requirements(read(name))
    assert torch_pins(requirements) == pins, f"{name} installs another torch than README"
    installs = lmlab_extras(requirements)
    assert installs, f"{name} does not install lmlab with extras"
    for installed in installs:
        assert installed >= extras, f"{name} installs fewer extras than README"


def test_the_dockerfile_runs_the_quickstart_by_default():
    cmd = [line for line in read("Dockerfile").splitlines() if line.startswith("CMD")]
    assert cmd and "quickstart" in cmd[-1]


# -- .env.example ------------------------------------------------------------------------------


def test_env_example_lists_the_variables_and_holds_no_token():
    text = read(".env.example")
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text), ".env.example holds a real-looking token"
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    expected = {
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "LMLAB_CPU_AUTO",
    }
    assert expected <= names
    for line in text.splitlines():
        if line.strip().startswith("HF_TOKEN="):
            assert line.strip() == "HF_TOKEN=", "HF_TOKEN must be left empty"
    assert ".env" in read(".gitignore").split(), ".env must be git-ignored"


# -- Makefile -----------------------------------------------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@needs_make
def test_make_dry_runs_the_documented_commands():
    done = make("-n", "test", "lint", "docs", "test-all", "test-gpu")
    assert done.returncode == 0, done.stderr
    assert "-m pytest" in done.stdout and "ruff check" in done.stdout
    assert "mkdocs build --strict" in done.stdout
    assert '-m "not gpu"' in done.stdout and "-m gpu" in done.stdout


@needs_make
def test_every_target_in_make_help_exists():
    done = make("help")
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^\s+([a-z][a-z-]*)\s", done.stdout, re.MULTILINE)
    expected = {
        "help",
        "install",
        "test",
        "test-all",
        "test-gpu",
        "lint",
        "format",
        "bench",
        "docs",
        "docs-serve",
        "quickstart",
        "clean",
    }
    assert expected <= set(listed), expected - set(listed)
    for target in listed:
        done = make("-n", target)
        assert done.returncode == 0, f"make -n {target}: {done.stderr}"


@needs_make
def test_make_bench_uses_a_real_preset_and_clean_keeps_runs():
    from lmlab.model.presets import MODEL_PRESETS

    bench = make("-n", "bench").stdout
    preset = re.search(r"--preset (\S+)", bench)
    assert preset and preset.group(1) in MODEL_PRESETS, bench
    clean = make("-n", "clean").stdout
    assert "rm -rf" in clean and not re.search(r"\bruns\b", clean)


# -- CI workflow -------------------------------------------------------------------------------


def test_workflow_runs_the_ci_steps_on_three_oses():
    workflow = yaml.safe_load(read(".github/workflows/ci.yml"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "pull_request" in triggers and "push" in triggers
    jobs = workflow["jobs"]
    oses = set()
    runs: list[str] = []
    for job in jobs.values():
        matrix = job.get("strategy", {}).get("matrix", {})
        oses |= set(matrix.get("os", [])) | {job["runs-on"]} - {"${{ matrix.os }}"}
        runs += [step.get("run", "") for step in job["steps"]]
    assert oses >= THREE_OSES
    everything = "\n".join(runs)
    assert 'python -m pytest -m "not gpu"' in everything
    assert "ruff check src tests benchmarks" in everything
    assert "bash .ci/wheel-check" in everything
    assert "mkdocs build --strict" in everything


# -- docs/windows.md and the posix marker ------------------------------------------------------


def windows_table_files() -> list[str]:
    text = read("docs/windows.md")
    section = text.split("## Tests marked `posix`", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(tests/[^`]+\.py)` \|", section, re.MULTILINE)


def test_every_file_in_the_windows_table_carries_the_posix_marker():
    listed = windows_table_files()
    assert listed, "docs/windows.md has no table of posix-marked test files"
    for name in listed:
        path = ROOT / name
        assert path.is_file(), f"docs/windows.md names {name}, which does not exist"
        assert "pytest.mark.posix" in path.read_text(encoding="utf-8"), name
    marked = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.posix" in path.read_text(encoding="utf-8")
        and path.name != Path(__file__).name
    }
    assert marked == set(listed), "docs/windows.md and the posix-marked tests differ"


def test_posix_marker_is_registered():
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        markers = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("posix:") for m in markers)


FAKE_WINDOWS = """
def pytest_configure(config):
    for plugin in config.pluginmanager.get_plugins():
        if hasattr(plugin, "_on_windows"):
            plugin._on_windows = lambda: True
"""

WHOLE_MODULE = """
import signal

import pytest

pytestmark = pytest.mark.posix
KILL = signal.NOT_ON_THIS_SYSTEM  # as signal.SIGKILL is on Windows: importing fails


def test_kill():
    pass
"""

SOME_TESTS = """
import pytest


@pytest.mark.posix
def test_posix_only():
    raise AssertionError("ran on Windows")


def test_anywhere():
    pass
"""


def test_posix_tests_skip_on_windows(tmp_path: Path):
    """tests/conftest.py as Windows runs it (its `_on_windows` made true): a module marked
    as a whole is skipped without being imported, a marked test is skipped, others run."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    posix: needs POSIX\n")
    (tmp_path / "fake_windows.py").write_text(FAKE_WINDOWS)
    (tmp_path / "test_whole.py").write_text(WHOLE_MODULE)
    (tmp_path / "test_some.py").write_text(SOME_TESTS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fake_windows", "-p", "no:cacheprovider", "-rs"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed, 2 skipped" in done.stdout, done.stdout[-3000:]
    assert "test_whole.py needs a POSIX system" in done.stdout
