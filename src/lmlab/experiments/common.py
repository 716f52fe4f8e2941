"""What every teaching experiment shares: the table of experiments, a results folder, data
that is prepared once, training runs in this process, curves read back, plots and a README
written from the numbers the run measured.

An experiment is a module in lmlab.experiments with

    def run(ctx: Context) -> dict      # the results (JSON-ready); plots and lesson via ctx

and a line in EXPERIMENTS. `run_experiment(name, ...)` makes the Context, calls it, and
writes results.json and README.md (the lesson, from `ctx.lesson(...)` paragraphs that
quote the measured numbers, followed by the plots and a table of the results).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab import __version__
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text

# name -> (module in lmlab.experiments, one line: the lesson it teaches)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "overfit": ("overfit", "the same model on 1%, 10% and 100% of a corpus: the train/val gap"),
    "lora-vs-full": (
        "lora_vs_full",
        "fine-tuning with LoRA vs every weight: trainable parameters, memory, speed, accuracy",
    ),
    "context-length": (
        "context_length",
        "one model at contexts from 1 to 256 characters, same tokens seen: loss vs. speed",
    ),
    "gpt2-vs-llama": (
        "gpt2_vs_llama",
        "GPT-2 vs. LLaMA at the same size on the same data: which learns faster, beyond noise",
    ),
    "copy-task": (
        "copy_task",
        "a small LLaMA learns to copy random strings: exact-match accuracy vs. step",
    ),
    "data-scaling": (
        "data_scaling",
        "the same model on growing shares of a corpus: val loss vs. tokens, best loss vs. data",
    ),
    "model-scaling": (
        "model_scaling",
        "4-5 model sizes at a fixed token budget: a power law L(N) fitted with its interval",
    ),
}

QUIET = ["logging.tensorboard=false", "train.device=cpu", "checkpoint.interval=0"]
"""Overrides every experiment run gets: CPU, no TensorBoard, a checkpoint only at the end."""


@dataclass
class ExperimentResult:
    """What `run_experiment` returns: the results, and where they were written."""

    name: str
    out: Path
    quick: bool
    results: dict[str, Any]
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def readme(self) -> Path:
        return self.out / "README.md"


@dataclass
class Context:
    """Handed to an experiment: where to write, how big to be, and helpers."""

    name: str
    out: Path
    quick: bool
    overrides: dict[str, Any]
    log: Callable[..., None]
    live: bool = False
    """Redraw each training run's progress line in place (a terminal)."""
    plots: list[Path] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)

    def option(self, key: str, default: Any) -> Any:
        """An experiment setting: the caller's override if given, else `default` (which
        usually depends on `quick`). Unknown overrides are refused by `run_experiment`."""
        value = self.overrides.get(key, default)
        return type(default)(value) if default is not None and value is not None else value

    def shakespeare_char(self) -> Path:
        """The shipped Shakespeare sample, char-level, the last 10% as validation (the
        classic split), prepared once under OUT/data."""
        from lmlab.data.prepare import prepare

        data = self.out / "data" / "shakespeare-char"
        if not (data / "manifest.json").is_file():
            prepare(
                ["sample:shakespeare"],
                data,
                "char",
                doc_unit="file",
                val_split="tail",
                overwrite=True,
                log=lambda *_: None,
            )
        return data

    def shakespeare_subset(self, fraction: float) -> Path:
        """The same data with only the first `fraction` of its training text (the same
        validation text and tokenizer), prepared once under OUT/data."""
        from lmlab.data.prepare import prepare
        from lmlab.data.samples import sample_path

        if fraction >= 1:
            return self.shakespeare_char()
        full = self.shakespeare_char()
        data = self.out / "data" / f"shakespeare-char-{fraction:g}"
        if not (data / "manifest.json").is_file():
            text = sample_path().read_text(encoding="utf-8")
            cut = int(len(text) * 0.9)  # the tail split's cut
            parts = self.out / "data" / "parts"
            parts.mkdir(parents=True, exist_ok=True)
            (parts / f"train-{fraction:g}.txt").write_text(text[: int(cut * fraction)], "utf-8")
            (parts / "val.txt").write_text(text[cut:], "utf-8")
            prepare(
                [str(parts / f"train-{fraction:g}.txt")],
                data,
                str(full / "tokenizer.json"),
                doc_unit="file",
                val_inputs=[str(parts / "val.txt")],
                overwrite=True,
                log=lambda *_: None,
            )
        return data

    def train(
        self, label: str, preset: str, data: Path, overrides: list[str] = ()
    ) -> dict[str, Any]:
        """Train one run of the experiment in this process, under OUT/runs/LABEL; returns
        {"run_dir", "history", "final_eval", "seconds", "params"}."""
        from lmlab.config import build_config
        from lmlab.model.build import param_count
        from lmlab.train.loop import train

        cfg = build_config(
            preset,
            overrides=[
                f"data.path={data}",
                f"logging.runs_dir={self.out / 'runs'}",
                f"logging.name={label}",
                *QUIET,
                *overrides,
            ],
        )
        self.log(f"  training {label}: {preset}, {cfg.train.max_steps} steps")
        started = time.perf_counter()
        result = train(
            cfg, log=self._progress if self.live else lambda *a, **k: None, live=self.live
        )
        if self.live:
            print("\r" + " " * 100 + "\r", end="", flush=True)  # the finished line goes
        return {
            "run_dir": result.run_dir,
            "history": result.history,
            "final_eval": result.final_eval,
            "seconds": time.perf_counter() - started,
            "params": param_count(result.config.model),
        }

    def plot(
        self,
        filename: str,
        series: dict[str, list[tuple[float, float]]],
        *,
        title: str,
        xlabel: str,
        ylabel: str,
        log_x: bool = False,
        log_y: bool = False,
        dashed: tuple[str, ...] = (),
    ) -> Path:
        """A PNG under OUT (one line per series; those in `dashed` dashed), shown in the
        README."""
        from lmlab.report.curves import plot_series

        path = self.out / filename
        plot_series(
            series,
            title=title,
            xlabel=xlabel,
            ylabel=ylabel,
            log_x=log_x,
            log_y=log_y,
            dashed=dashed,
            out=path,
        )
        self.plots.append(path)
        return path

    @staticmethod
    def _progress(message: str, end: str = "\n") -> None:
        """Only the training loop's redrawn step line (the others would scroll)."""
        if message.startswith("\r"):
            print(message, end="", flush=True)

    def lesson(self, text: str) -> None:
        """A paragraph of the README; write it from the numbers this run measured."""
        self.paragraphs.append(text.strip())


def curve(history: list[dict[str, Any]], key: str, x: str = "step") -> list[tuple[float, float]]:
    """(x, value) of every record that has a finite `key`."""
    points = []
    for record in history:
        value = record.get(key)
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            points.append((float(record[x]), float(value)))
    return points


def experiment_options(name: str) -> dict[str, str]:
    """An experiment's options (`KEY=VALUE` on the command line, keywords in Python), each
    with what it sets and its quick and full defaults."""
    return dict(
        getattr(importlib.import_module(f"lmlab.experiments.{EXPERIMENTS[name][0]}"), "OPTIONS", {})
    )


def run_experiment(
    name: str,
    out: str | Path | None = None,
    *,
    quick: bool = False,
    log: Callable[..., None] = print,
    live: bool = False,
    **overrides: Any,
) -> ExperimentResult:
    """Run a teaching experiment; writes OUT/results.json, OUT/README.md and the plots
    (OUT defaults to experiments/NAME, or experiments/NAME-quick with `quick`)."""
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    module = importlib.import_module(f"lmlab.experiments.{EXPERIMENTS[name][0]}")
    known = set(getattr(module, "OPTIONS", {}))
    unknown = sorted(set(overrides) - known)
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise UserError(f"experiment {name} has no option {unknown[0]!r}; its options: {listed}")
    folder = (
        Path(out) if out is not None else Path("experiments") / (name + ("-quick" if quick else ""))
    )
    folder.mkdir(parents=True, exist_ok=True)
    ctx = Context(name, folder, quick, dict(overrides), log, live)
    commit = _commit()  # the code that runs, not what the tree holds when it ends
    started = time.perf_counter()
    results = module.run(ctx)
    seconds = time.perf_counter() - started
    record = {
        "experiment": name,
        "quick": quick,
        "options": overrides,
        "seconds": round(seconds, 1),
        "lmlab": __version__,
        "commit": commit,
        "machine": f"{platform.machine()}, {platform.system()}",
        "results": results,
    }
    atomic_write_text(folder / "results.json", json.dumps(record, indent=2, default=_json) + "\n")
    atomic_write_text(folder / "README.md", _readme(ctx, record))
    return ExperimentResult(name, folder, quick, results, list(ctx.plots), seconds)


def _commit() -> str | None:
    from lmlab.runs.provenance import source_commit

    return source_commit()


def _json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def _readme(ctx: Context, record: dict[str, Any]) -> str:
    title = f"# Experiment: {ctx.name}" + (" (quick)" if ctx.quick else "")
    how = (
        f"Run with `lmlab experiment {ctx.name}{' --quick' if ctx.quick else ''}` "
        f"(lmlab {record['lmlab']}"
        + (f", commit {record['commit'][:7]}" if record["commit"] else "")
        + f") in {record['seconds']:.0f} s on {record['machine']}. Every number below was "
        "measured by this run; results.json holds them all."
    )
    parts = [title, EXPERIMENTS[ctx.name][1][0].upper() + EXPERIMENTS[ctx.name][1][1:] + ".", how]
    parts += ctx.paragraphs
    parts += [f"![{p.stem}]({p.name})" for p in ctx.plots]
    return "\n\n".join(parts) + "\n"
