"""The metrics log, `RUN_DIR/metrics.jsonl`: one JSON object per line, appended as a run goes.

    {"event": "start", "step": 0, "time": "..."}                 each time training starts or resumes
    {"step": 10, "loss": 2.31, "lr": ..., "tokens_seen": ..., "tokens_per_s": ..., "elapsed_s": ...}
    {"step": 200, "val_loss": 1.95, "val_perplexity": ..., "elapsed_s": ...}

    {"event": "rollback", "step": 300, ...}                      a rollback went back to step 300

`elapsed_s` is the wall clock of the invocation that wrote the line. A run resumed from a
checkpoint at step N repeats the steps after N that the stopped invocation had already
logged; `read_metrics` keeps only the records of the history that the run actually has.
Every line is strict JSON: a non-finite number is written as null and its key listed in
"nonfinite". TensorBoard events (when the package is installed) mirror the same numbers,
and a resume purges the events past the step it resumed from.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends records to metrics.jsonl (and TensorBoard), flushing each one."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_NAME
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tensorboard = tensorboard
        self._tb = None

    def start(self, step: int, event: str = "start") -> None:
        """Mark where this invocation starts (0, or the step it resumed from), or where a
        rollback took the run back to (event="rollback"). TensorBoard drops the events
        after `step` that a stopped invocation (or the rolled-back steps) had written."""
        self._write({"event": event, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if self._tensorboard:
            if self._tb is not None:
                self._tb.close()
            self._tb = _tensorboard(self.run_dir, purge_step=step + 1 if step > 0 else None)

    def write(self, entry: dict[str, Any]) -> None:
        self._write(entry)
        if self._tb is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, entry["step"])

    def _write(self, entry: dict[str, Any]) -> None:
        # Strict JSON: a non-finite number is written as null, and named in "nonfinite".
        bad = [k for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            entry = {**{k: (None if k in bad else v) for k, v in entry.items()}, "nonfinite": bad}
        self._file.write(json.dumps(entry, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl as written (a torn last line from a kill is skipped)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's history: step records, without those a later resume superseded."""
    history: list[dict[str, Any]] = []
    for record in read_records(run_dir):
        if record.get("event") in ("start", "rollback"):
            history = [r for r in history if r["step"] <= record["step"]]
        else:
            history.append(record)
    return history


def wall_time_s(run_dir: str | Path) -> float:
    """Wall-clock seconds the run has trained, over all its invocations."""
    total, last = 0.0, 0.0
    for record in read_records(run_dir):
        if record.get("event") == "start":
            total, last = total + last, 0.0
        else:
            last = max(last, record.get("elapsed_s") or 0.0)
    return total + last


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Last step, tokens, losses and speed of a history from `read_metrics`."""
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "val_loss" in r]
    return {
        "step": max((r["step"] for r in history), default=0),
        "tokens_seen": train[-1].get("tokens_seen") if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "best_val_loss": min((r["val_loss"] for r in evals), default=None),
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
        "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
    }


def _tensorboard(run_dir: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
