"""The `lmlab` command: a table of subcommands, each implemented in its own module.

Each entry points at a function `main(argv: list[str]) -> int | None` that owns its
argument parser. Modules are imported only when their command runs, so `lmlab --help`
stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from lmlab.errors import UserError

# name -> (module:function, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "lmlab.experiments.quickstart:main",
        "Train a small model on FLOWROLL end to end, in minutes on a CPU",
    ),
    "dsl": (
        "lmlab.data.dsl.cli:main",
        "Generate and score the practice languages FLOWROLL and DIMMATCH",
    ),
    "tokenizer": (
        "lmlab.data.tokenizer_cli:main",
        "Train a byte-level BPE or char-level tokenizer",
    ),
    "prepare": (
        "lmlab.data.prepare:main",
        "Tokenize text, JSONL, HF datasets or a practice language into token shards",
    ),
    "data": ("lmlab.data.data_cli:main", "Inspect or verify a prepared data directory"),
    "config": ("lmlab.config_cli:main", "Show presets and resolved configurations"),
    "train": ("lmlab.train.cli:main", "Train a model (resumable; CPU, MPS or CUDA)"),
    "eval": ("lmlab.eval.cli:main", "Evaluate a checkpoint: val loss, perplexity, bits per byte"),
    "generate": (
        "lmlab.generate.cli:main",
        "Generate text from a checkpoint, streaming to the terminal",
    ),
    "bench": (
        "lmlab.train.bench:main",
        "Measure training tokens/s, step time, MFU and peak memory of a preset, as JSON",
    ),
    "plan": (
        "lmlab.estimate.cli:main",
        "Estimate parameters, FLOPs, memory, time, cost and loss before training",
    ),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: lmlab <command> [options]   (lmlab <command> --help for details and examples)",
        "",
        "commands:",
    ]
    for name, (target, text) in COMMANDS.items():
        if _available(target):
            lines.append(f"  {name.ljust(width)}  {text}")
    lines += ["", "example:", "  lmlab quickstart"]
    return "\n".join(lines)


def _available(target: str) -> bool:
    module = target.split(":")[0]
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lmlab` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0)
    if argv[0] == "--version":
        from lmlab import __version__

        print(f"lmlab {__version__}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS or not _available(COMMANDS[name][0]):
        print(f"lmlab: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        code = func(rest)
    except UserError as e:
        print(f"lmlab {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"lmlab {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
