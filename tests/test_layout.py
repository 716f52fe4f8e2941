"""The package layout holds: every module imports, and packages import only downward."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lmlab

SRC = Path(lmlab.__file__).parent

# Lowest first. A package may import itself and packages listed before it, never after:
# data flows one way, and no two packages import each other.
ORDER = [
    "errors",
    "fileio",
    "processes",
    "typed_dict",
    "lmlab",  # the package's own __init__ (__version__)
    "model",
    "data",
    "recipes",
    "config",
    "runs",
    "generate",
    "eval",
    "estimate",
    "train",
    "export",
    "finetune",
    "report",  # plots and HTML reports of runs; experiments draw their figures with it
    "experiments",
    "doctor",  # reads the machine and the runs folder; imported only by its command
    "commands",
    "cli",
    "__main__",
]


def _modules() -> list[str]:
    names = ["lmlab"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="lmlab."):
        names.append(info.name)
    return sorted(names)


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lmlab"


def _imports(module: str) -> set[str]:
    """lmlab modules that `module` imports anywhere in its file, lazily or not."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lmlab":  # `from lmlab import x`: a submodule, or a name in __init__
                found |= {
                    f"lmlab.{a.name}"
                    if (SRC / f"{a.name}.py").exists() or (SRC / a.name).is_dir()
                    else "lmlab"
                    for a in node.names
                }
            elif node.module.startswith("lmlab."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lmlab")}
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in _modules():
        source = _package_of(module)
        for target in _imports(module):
            if _package_of(target) != source:
                graph.setdefault(source, set()).add(_package_of(target))
    return graph


@pytest.mark.parametrize("module", _modules())
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_package_is_placed_in_the_order():
    packages = {_package_of(m) for m in _modules()}
    assert packages <= set(ORDER), packages - set(ORDER)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Edges that go up the order (any cycle has at least one)."""
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(
        f"{source} imports {target}"
        for source, targets in graph.items()
        for target in targets
        if rank[target] >= rank[source]
    )


def test_packages_import_only_downward_and_form_no_cycle():
    assert upward_imports(package_graph()) == []


def test_the_check_reports_a_cycle():
    cycle = {"eval": {"runs", "train"}, "train": {"eval"}}
    assert upward_imports(cycle) == ["eval imports train"]


def test_runs_imports_none_of_its_users():
    assert not package_graph().get("runs", set()) & {
        "train",
        "eval",
        "generate",
        "experiments",
        "commands",
    }


def test_every_command_is_one_module_in_commands():
    from lmlab.cli import COMMANDS, command_module

    modules = {info.name for info in pkgutil.iter_modules([str(SRC / "commands")])}
    assert modules == set(COMMANDS)
    for name in COMMANDS:
        assert callable(importlib.import_module(command_module(name)).main)


@pytest.mark.parametrize("path", ["train/loop.py", "train/setup.py"])
def test_training_loop_functions_fit_on_a_screen(path):
    tree = ast.parse((SRC / path).read_text(encoding="utf-8"))
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long
