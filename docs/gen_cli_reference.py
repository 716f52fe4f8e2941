"""Write docs/reference/cli.md from the `--help` of every lmlab command and subcommand.

    python docs/gen_cli_reference.py           # rewrite docs/reference/cli.md
    python docs/gen_cli_reference.py --check   # exit 1 if it differs from what the commands print

The page is never edited by hand, so it cannot drift from the code. Each help text comes from
running the command's own `main([..., "--help"])` in this process, with stdout captured and
COLUMNS fixed, so the wrapping does not depend on the terminal. Subcommands are found two
ways: the argparse subparsers of the parser that printed the help (`lmlab runs list`), and
bare words in the help's example lines (`lmlab plan api`, dispatched by hand before argparse);
a word counts only when its own help says `usage: lmlab CMD WORD`.

argparse's layout changes between Python versions ("options:" in 3.10+, the order of short and
long flags in 3.13), so the page records the Python version it was generated with.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

from lmlab import cli

COLUMNS = 100
"""Terminal width argparse formats for: fixed, so the page is the same on every machine."""
HELP_ENV = {"COLUMNS": str(COLUMNS), "NO_COLOR": "1", "PYTHON_COLORS": "0"}
"""Environment while help is formatted: the fixed width, and no colours (Python 3.14+)."""
OUT = Path(__file__).resolve().parent / "reference" / "cli.md"
REGENERATE = "python docs/gen_cli_reference.py"
MAX_DEPTH = 3  # lmlab CMD SUB SUBSUB: deeper than any command nests


def python_version() -> str:
    """The Python the page is generated with, as written in its header."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@contextlib.contextmanager
def _help_environment() -> Iterator[None]:
    """HELP_ENV while argparse formats (it reads COLUMNS for every help text), then as before."""
    with mock.patch.dict(os.environ, HELP_ENV):
        yield


def _run_help(
    main: Callable[[list[str]], object], argv: list[str]
) -> tuple[str, list[argparse.ArgumentParser]]:
    """(stdout of main(argv + ['--help']), the parsers that printed help)."""
    printed: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help

    def recording_print_help(self, file=None):
        printed.append(self)
        return original(self, file)

    out = io.StringIO()
    with (
        _help_environment(),
        contextlib.redirect_stdout(out),
        mock.patch.object(argparse.ArgumentParser, "print_help", recording_print_help),
        contextlib.suppress(SystemExit),  # argparse's --help ends with exit(0)
    ):
        main([*argv, "--help"])
    return out.getvalue().rstrip() + "\n", printed


def _subparser_names(parsers: list[argparse.ArgumentParser]) -> list[str]:
    """The subcommand names of these parsers' argparse subparsers, in their order."""
    names: list[str] = []
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                names += [n for n in action.choices if n not in names]
    return names


def _example_words(help_text: str, prog: str) -> list[str]:
    """Bare words that follow `prog` in the help's lines: candidate hand-made subcommands."""
    pattern = re.compile(rf"(?:^|\s){re.escape(prog)} ([a-z][a-z0-9_-]*)(?=\s|$)", re.MULTILINE)
    return list(dict.fromkeys(pattern.findall(help_text)))


def command_helps(name: str) -> list[tuple[str, str]]:
    """[(prog, help text)] for `lmlab NAME` and each of its subcommands, depth first."""
    module = cli.command_module(name)
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as e:
        if e.name != module:  # the command exists but needs something missing: a real error
            raise
        # A command listed in COMMANDS before its module is written (or merged).
        text = f"(`lmlab {name} --help` could not be run: {e}; regenerate with `{REGENERATE}`)\n"
        return [(f"lmlab {name}", text)]
    found: list[tuple[str, str]] = []

    def visit(argv: list[str], text: str, parsers: list[argparse.ArgumentParser]) -> None:
        prog = " ".join(["lmlab", name, *argv])
        found.append((prog, text))
        if len(argv) + 1 >= MAX_DEPTH:
            return
        candidates = _subparser_names(parsers) + _example_words(text, prog)
        for word in dict.fromkeys(candidates):
            sub_text, sub_parsers = _run_help(main, [*argv, word])
            if sub_text.startswith(f"usage: {prog} {word}"):  # else not a subcommand
                visit([*argv, word], sub_text, sub_parsers)

    visit([], *_run_help(main, []))
    return found


def top_level_help() -> str:
    """What `lmlab --help` prints."""
    out = io.StringIO()
    with _help_environment(), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main(["--help"])
    return out.getvalue().rstrip() + "\n"


def render() -> str:
    """The whole page, as the commands print it now."""
    lines = [
        "# CLI reference",
        "",
        f"<!-- Generated by `{REGENERATE}` (Python {python_version()}, COLUMNS={COLUMNS}). "
        "Do not edit: regenerate. -->",
        "",
        "Every command's `--help`, exactly as it prints it (generated from the code by "
        "`docs/gen_cli_reference.py`; a test fails when this page is out of date). "
        "`lmlab COMMAND --help` prints the same in your terminal.",
        "",
        "## lmlab",
        "",
        "```text",
        top_level_help().rstrip("\n"),
        "```",
    ]
    for name in cli.COMMANDS:
        for prog, text in command_helps(name):
            level = "##" if prog == f"lmlab {name}" else "###"
            lines += ["", f"{level} {prog}", "", "```text", text.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def recorded_python_version(page: str) -> str | None:
    """The Python version a generated page names in its header, or None."""
    found = re.search(r"\(Python (\d+\.\d+),", page)
    return found.group(1) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the page differs; write nothing"
    )
    args = parser.parse_args(argv)
    page = render()
    current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
    if args.check:
        if page != current:
            print(f"{OUT} is out of date: run `{REGENERATE}`", file=sys.stderr)
            recorded = recorded_python_version(current)
            if recorded and recorded != python_version():
                print(
                    f"(it was generated with Python {recorded}, this is {python_version()}: "
                    "argparse lays help out differently across versions)",
                    file=sys.stderr,
                )
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if page != current:
        tmp = OUT.with_name(f".{OUT.name}.tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(OUT)
    missing = re.findall(r"`(lmlab \S+) --help` could not be run", page)
    for prog in missing:
        print(f"warning: `{prog} --help` could not be run; its section is a placeholder")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
