"""`lmlab doctor`: check this machine before training (the checks are in lmlab.doctor)."""

from __future__ import annotations

import argparse
import json
import sys

from lmlab.doctor import Check, run_checks, summarize

EPILOG = """examples:
  lmlab doctor
  lmlab doctor --runs-dir /data/runs      # free disk where your runs go
  lmlab doctor --no-network               # skip the Hugging Face Hub request
  lmlab doctor --json > doctor.json       # attach to a bug report

Each line is ok, warning or error, with a fix for the last two. The exit status is 1
when a check is an error, else 0 (warnings allowed). The Hub token is reported as found
or not, never printed."""

_COLORS = {"ok": "green", "warning": "yellow", "error": "red"}


def _summary_line(summary: dict) -> str:
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'s' if n != 1 else ''}"

    return (
        f"{summary['ok']} ok, {plural(summary['warning'], 'warning')}, "
        f"{plural(summary['error'], 'error')}"
    )


def _print_plain(checks: list[Check], summary: dict) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        line = f"{c.status:<7}  {c.name:<{width}}  {c.found}"
        if c.fix:
            line += f"  -> fix: {c.fix}"
        print(line)
    print(_summary_line(summary))


def _print_table(checks: list[Check], summary: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lmlab doctor")
    for column in ("status", "check", "found", "fix"):
        table.add_column(column)
    for c in checks:
        color = _COLORS[c.status]
        table.add_row(f"[{color}]{c.status}[/{color}]", c.name, escape(c.found), escape(c.fix))
    console = Console()
    console.print(table)
    console.print(_summary_line(summary))


def main(argv: list[str]) -> int:
    """Run `lmlab doctor ARGV...`: 1 when a check is an error, else 0."""
    parser = argparse.ArgumentParser(
        prog="lmlab doctor",
        description="Check this machine: Python, torch build, devices and memory, threads and "
        "CPU load, free disk, optional packages, and the Hugging Face Hub.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="where runs go (default: runs)"
    )
    parser.add_argument(
        "--no-network", action="store_true", help="do not contact the Hugging Face Hub"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    checks = run_checks(args.runs_dir, network=not args.no_network)
    summary = summarize(checks)
    if args.json:
        report = {"checks": [c.to_dict() for c in checks], "summary": summary}
        print(json.dumps(report, indent=2))
    elif sys.stdout.isatty():
        _print_table(checks, summary)
    else:
        _print_plain(checks, summary)
    return 1 if summary["error"] else 0
