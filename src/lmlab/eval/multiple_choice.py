"""Multiple-choice tasks scored by log-likelihood: `lmlab eval RUN --task mc.jsonl`.

A task is a JSONL file, one example per line, in the shape of HellaSwag and ARC:

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}

(an optional "id" is carried into the per-example records). The model reads the context
and each choice after it; a choice's score is the sum of the log-probabilities of its
tokens. Two accuracies, as lm-evaluation-harness defines them:

    accuracy   the choice with the highest sum is the label
    acc_norm   the highest sum divided by the choice's length in characters, which
               removes the advantage short choices have (fewer tokens, fewer losses)

Tokenization follows lm-eval's `hf` model, so that a model exported with `lmlab export`
gets the same numbers there: trailing whitespace of the context moves to the front of
the choice, context+choice is encoded as one text, and the choice's tokens are those
after the context's own encoding. Context and choice are joined as they are (put the
space in the choices, as above). An empty context is read after the end-of-text token.
When context+choice is longer than the model's context, the oldest tokens are dropped
(counted in `truncated`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import UserError
from lmlab.eval.score import (
    CONFIDENCE,
    MetricScore,
    bootstrap_resamples,
    check_bootstrap,
    percentile_interval,
)
from lmlab.runs.load import LoadedModel

FORMAT = "lmlab-multiple-choice"
FORMAT_VERSION = 1
METRICS = ("accuracy", "acc_norm")


@dataclass(frozen=True)
class Example:
    """One question: the context, its choices, the index of the right one."""

    context: str
    choices: list[str]
    label: int
    id: Any = None


@dataclass
class ChoiceReport:
    """Accuracies with bootstrap intervals, and one record per example."""

    task: str
    aggregates: dict[str, MetricScore]
    records: list[dict[str, Any]]
    """{"index", "id", "label", "loglikelihoods", "predicted", "predicted_norm", "correct",
    "correct_norm"} per example."""
    truncated: int
    """Requests (example, choice) whose oldest tokens were dropped to fit the context."""
    bootstrap: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "task": self.task,
            "examples": len(self.records),
            "truncated": self.truncated,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "confidence": CONFIDENCE,
            "metrics": {
                name: {"value": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high, "n": s.n}
                for name, s in self.aggregates.items()
            },
        }


def read_task(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a task file; every malformed line is a UserError naming FILE:LINE."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if path.is_dir():
        raise UserError(f"--task {path} is a folder: expected a .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--task {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        examples.append(_example(record, where))
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples[:limit] if limit is not None else examples


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("context", "choices", "label") if k not in record]
    if missing:
        raise UserError(
            f"{where}: missing {', '.join(missing)} (a task line is "
            '{"context": str, "choices": [str, ...], "label": int})'
        )
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise UserError(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where}: 'choices' must be a list of at least 2 strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise UserError(f"{where}: choices[{i}] must be a non-empty string")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(
            f"{where}: 'label' must be an index into choices (0..{len(choices) - 1}), got {label!r}"
        )
    return Example(context, list(choices), label, record.get("id"))


def encode_pair(context: str, choice: str, loaded: LoadedModel) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) the way lm-eval's `hf` model splits them (module docstring)."""
    tokenizer = loaded.tokenizer
    stripped = context.rstrip()
    choice, context = context[len(stripped) :] + choice, stripped
    whole = tokenizer.encode(context + choice)
    if not context:
        return [tokenizer.eot_id], whole
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def choice_loglikelihoods(
    loaded: LoadedModel,
    examples: list[Example],
    *,
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[list[float]], int]:
    """The log-likelihood of every choice of every example, and how many were truncated.

    Requests run in batches of similar length, right-padded (a causal model's logits at a
    position ignore whatever comes after it). `on_progress(requests_done)`.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    model = loaded.model
    context = model.config.context_length
    device = next(model.parameters()).device
    requests = []  # (example, choice, context+choice ids, number of choice tokens)
    truncated = 0
    for e, example in enumerate(examples):
        for c, choice in enumerate(example.choices):
            context_ids, choice_ids = encode_pair(example.context, choice, loaded)
            if not choice_ids:
                raise UserError(f"example {e + 1}: choice {c} encodes to no tokens")
            ids = context_ids + choice_ids
            if len(ids) > context + 1:
                truncated += 1
                ids = ids[-(context + 1) :]  # keep the choice and the newest context
            requests.append((e, c, ids, min(len(choice_ids), len(ids) - 1)))
    scores = [[0.0] * len(example.choices) for example in examples]
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    done = 0
    for start in range(0, len(order), batch_size):
        batch = [requests[r] for r in order[start : start + batch_size]]
        # The model reads all but the last token; the logits at position i predict token
        # i + 1, so the n choice tokens are predicted at the n positions before the end.
        width = len(batch[0][2]) - 1
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (_, _, ids, _) in enumerate(batch):
            idx[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        logits, _ = model(idx.to(device))  # (B, width, vocab_size)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for b, (e, c, ids, n) in enumerate(batch):
            positions = torch.arange(len(ids) - 1 - n, len(ids) - 1, device=device)  # (n,)
            targets = torch.tensor(ids[-n:], device=device)  # (n,)
            scores[e][c] = float(logprobs[b, positions, targets].sum())
        done += len(batch)
        if on_progress is not None:
            on_progress(done)
    return scores, truncated


def score_task(
    loaded: LoadedModel,
    examples: list[Example],
    *,
    task: str = "task",
    batch_size: int = 16,
    bootstrap: int = 1000,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> ChoiceReport:
    """Accuracy and acc_norm of a model on examples, with bootstrap 95% intervals."""
    check_bootstrap(bootstrap, seed)
    scores, truncated = choice_loglikelihoods(
        loaded, examples, batch_size=batch_size, on_progress=on_progress
    )
    records = []
    for i, (example, lls) in enumerate(zip(examples, scores, strict=True)):
        lengths = [len(choice) for choice in example.choices]  # characters, as lm-eval
        predicted = int(np.argmax(lls))
        predicted_norm = int(np.argmax([ll / n for ll, n in zip(lls, lengths, strict=True)]))
        records.append(
            {
                "index": i,
                "id": example.id,
                "label": example.label,
                "loglikelihoods": lls,
                "predicted": predicted,
                "predicted_norm": predicted_norm,
                "correct": predicted == example.label,
                "correct_norm": predicted_norm == example.label,
            }
        )
    per_example = {
        "accuracy": np.array([float(r["correct"]) for r in records]),
        "acc_norm": np.array([float(r["correct_norm"]) for r in records]),
    }
    n = len(records)
    resamples = bootstrap_resamples(per_example, {}, n, bootstrap, seed) if bootstrap else {}
    aggregates = {}
    for name, values in per_example.items():
        low, high = percentile_interval(resamples[name]) if bootstrap else (None, None)
        aggregates[name] = MetricScore(float(values.mean()), low, high, n)
    return ChoiceReport(task, aggregates, records, truncated, bootstrap, seed)


def total_requests(examples: list[Example]) -> int:
    """How many (example, choice) pairs the model scores: the progress bar's total."""
    return sum(len(e.choices) for e in examples)
