"""The `lmlab` command: a table of subcommands.

One rule for where a command lives: `lmlab NAME` is `lmlab.commands.NAME.main(argv) -> int`,
which parses arguments and prints; the work itself is done by library functions in the
packages (data, train, runs, eval, ...). Modules are imported only when their command
runs, so `lmlab --help` stays fast (no torch import).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from lmlab.errors import UserError

# name -> one-line description; the code is lmlab.commands.<name>:main
COMMANDS: dict[str, str] = {
    "quickstart": "Train a small model on FLOWROLL end to end, in minutes on a CPU",
    "doctor": "Check this machine: Python, torch build, devices, threads, disk, extras, Hub",
    "dsl": "Generate and score the practice languages FLOWROLL and DIMMATCH",
    "tokenizer": "Train a byte-level BPE or char-level tokenizer",
    "prepare": "Tokenize text, JSONL, HF datasets or a practice language into token shards",
    "data": "Inspect or verify a prepared data directory",
    "config": "Show presets and resolved configurations",
    "plan": "Estimate parameters, FLOPs, memory, time, cost and loss before training",
    "train": "Train a model (resumable; CPU, MPS or CUDA)",
    "finetune": "Fine-tune a model on your data: full, LoRA or DPO (lmlab runs or HF models)",
    "export": "Export a run as a Hugging Face folder (transformers) or a GGUF file (llama.cpp)",
    "publish": "Publish a run on the Hugging Face Hub with a model card (or --dry-run)",
    "lora": "Export a LoRA fine-tune as a PEFT adapter, or merge it into a full model",
    "bench": "Measure training tokens/s, step time, MFU and peak memory of a preset, as JSON",
    "runs": "List, show, compare, delete and clean up training runs",
    "experiment": "Run a teaching experiment (overfitting, scaling...) ending in plots and a README",
    "report": "Write one self-contained HTML report of runs: curves, config, metrics, samples",
    "plot": "Plot one metric of one or more runs over steps into a PNG",
    "eval": "Evaluate a checkpoint: val loss, perplexity, bits per byte; multiple-choice tasks",
    "predict": "Generate predictions for a JSONL file or practice language, in batches",
    "score": "Score a predictions file: exact match, F1, ROUGE, BLEU, chrF, execution accuracy",
    "compare": "Compare two models on one task (predict + score both): before/after a fine-tune",
    "generate": "Generate text from a checkpoint, streaming to the terminal",
    "chat": "Chat with a chat-tuned model in the terminal (its chat template, streamed replies)",
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: lmlab <command> [options]   (lmlab <command> --help for details and examples)",
        "",
        "commands:",
    ]
    for name, text in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {text}")
    lines += ["", "example:", "  lmlab quickstart"]
    return "\n".join(lines)


# errno values of a path the user may not read or write (permissions, a read-only disk)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
# errno values of a full disk (or quota): what was being written is left out, the last
# complete file or checkpoint stays (every write is atomic)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _denied_message(e: OSError) -> str:
    path = str(e.filename or "")
    name = path.rsplit("/", 1)[-1]
    if name.startswith(".") and name.endswith(".tmp"):  # an atomic write's temporary: its folder
        path = path.rsplit("/", 1)[0]
    if e.errno in _FULL:
        where = f" writing {path}" if path else ""
        return (
            f"no space left on the device{where}: nothing was half-written (the last complete "
            "files and checkpoints are intact); free some space and run the command again"
        )
    reason = "read-only file system" if e.errno == errno.EROFS else "permission denied"
    return f"no access to {path or 'a file'} ({reason}): choose a folder you may write to, or change its permissions"


def command_module(name: str) -> str:
    """The module that implements `lmlab NAME`."""
    return f"lmlab.commands.{name}"


def _interrupted_status() -> int:
    """The exit status after a Ctrl-C: 130, but 0 in a worker of `--nproc K` (which leaves
    the status to its launcher; torchrun would otherwise report a failed worker)."""
    return 0 if os.environ.get("LMLAB_LAUNCHED") == "1" else 130


@contextlib.contextmanager
def _ctrl_c_leaves_at_once(name: str) -> Iterator[None]:
    """While a command's modules import (torch among them), Ctrl-C ends the process at once.

    Nothing is on disk yet. A KeyboardInterrupt raised there is not safe: torch's C start-up
    imports numpy and, when that import fails, swallows the error and goes on, so the command
    either ran on with a half-imported numpy (a traceback later) or ignored the Ctrl-C.
    """
    ours = threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if not ours:  # Ctrl-C ignored (a background job), or someone else's handler: leave it
        yield
        return

    def leave(signum, frame):
        os.write(2, f"lmlab {name}: interrupted\n".encode())
        os._exit(_interrupted_status())

    signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    if name not in COMMANDS:
        print(f"lmlab: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        with _ctrl_c_leaves_at_once(name):
            command = importlib.import_module(command_module(name))
        code = command.main(rest)
    except UserError as e:
        print(f"lmlab {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a folder the user cannot write to is their setup, not a bug
        if e.errno not in _DENIED + _FULL:
            raise
        print(f"lmlab {name}: error: {_denied_message(e)}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # The reader of our output went away (`lmlab doctor --json | head`): not an error of
        # ours. Point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        print(f"lmlab {name}: interrupted", file=sys.stderr)
        code = _interrupted_status()
        # A Ctrl-C that interrupted an import inside C code (torch's) makes CPython end the
        # process by SIGINT at exit, whatever sys.exit said: leave with the status now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code or 0)
