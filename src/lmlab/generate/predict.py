"""Predictions for a file of prompts: `lmlab predict`, and `lmlab compare` underneath.

Inputs, one JSON object per line (every field is kept in the output):

    {"prompt": "..."}                                   the text to continue, as is
    {"messages": [{"role": ..., "content": ...}, ...]}  a conversation, through the model's
                                                        chat template; a final assistant
                                                        turn is the reference, not prompt
    dsl:NAME[:N[:DIFFICULTY]]                           N test programs of a practice
                                                        language (default 200): prompt
                                                        `PROGRAM =>`, reference `RESULT`,
                                                        stop at the end of the line

Each record gains "prediction": the generated text, without the end-of-text token or the
stop string that ended it. Generation is batched (left-padded, lmlab.generate.batch); with
temperature 0 a record's prediction is the same as generating it alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.chat import ROLES, Message, chat_prompt_ids
from lmlab.errors import UserError
from lmlab.generate.batch import generate_batch
from lmlab.runs.load import LoadedModel

DEFAULT_DSL_RECORDS = 200
PREDICTION_FIELD = "prediction"
END_OF_TURN_MARK = "<|end|>"
"""Where a reply ends in lmlab's default chat layout (data/chat.py)."""


@dataclass
class PredictOptions:
    """How to generate: greedy by default, up to max_new_tokens, stopping at end of text."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Strings that end a prediction (not included in it)."""
    stop_at_eot: bool = True
    batch_size: int = 8
    prompt_field: str = "prompt"

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if any(s == "" for s in self.stop):
            raise UserError("--stop strings must not be empty")


def read_inputs(spec: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL file or a `dsl:NAME[:N[:DIFFICULTY]]` spec (its test split)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    text = str(spec)
    if text.startswith("dsl:"):
        records = _dsl_records(text)
    else:
        records = _jsonl_records(Path(spec))
    return records[:limit] if limit is not None else records


def _dsl_records(spec: str) -> list[dict[str, Any]]:
    from lmlab.data.corpus import parse_dsl_spec
    from lmlab.data.dsl import format_prompt, generate_corpus, get_language, split_line

    if spec.count(":") == 1:
        spec = f"{spec}:{DEFAULT_DSL_RECORDS}"  # a few hundred test programs, not a corpus
    name, n, difficulty = parse_dsl_spec(spec)
    lang = get_language(name)
    records = []
    for line in generate_corpus(lang, n, seed=0, difficulty=difficulty, split="test"):
        program, result = split_line(line)
        records.append(
            {
                "prompt": format_prompt(program),
                "reference": result,
                "dsl": name,
                "difficulty": lang.difficulty(lang.parse(program)),
            }
        )
    return records


def _jsonl_records(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        raise UserError(f"--input {path} is a folder: expected a .jsonl file or dsl:NAME")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--input {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def _messages(record: dict[str, Any], where: str) -> list[Message]:
    value = record["messages"]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{i}] needs a string 'content'")
        if m.get("role") not in ROLES:
            raise UserError(
                f"{where}: messages[{i}] has role {m.get('role')!r}; expected one of {', '.join(ROLES)}"
            )
        messages.append(Message(m["role"], m["content"]))
    return messages


def prompt_ids(
    record: dict[str, Any], loaded: LoadedModel, prompt_field: str, where: str
) -> tuple[list[int], list[str]]:
    """(prompt token ids, extra stop strings) of one record."""
    tokenizer = loaded.tokenizer
    if prompt_field in record:
        prompt = record[prompt_field]
        if not isinstance(prompt, str):
            raise UserError(f"{where}: {prompt_field!r} must be a string")
        # An empty prompt starts a new document, as `lmlab generate` does. A practice-
        # language answer is one line: what follows a newline is a new program.
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
        return ids, (["\n"] if "dsl" in record else [])
    if "messages" in record:
        messages = _messages(record, where)
        if messages[-1].role == "assistant":
            record.setdefault("reference", messages[-1].content)
            messages = messages[:-1]
        if not messages:
            raise UserError(f"{where}: a conversation needs a turn before the reply")
        ids = chat_prompt_ids(messages, tokenizer, loaded.chat_template, loaded.template_vars)
        # lmlab's own layout ends a reply with <|end|>; other templates with the eos token.
        return ids, ([END_OF_TURN_MARK] if loaded.chat_template is None else [])
    raise UserError(
        f"{where}: no {prompt_field!r} or 'messages' field (it has: {', '.join(record) or 'nothing'})"
    )


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def predict(
    loaded: LoadedModel,
    records: list[dict[str, Any]],
    options: PredictOptions,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Each record with its "prediction" added (new dicts; the inputs are not changed)."""
    options.check()
    tokenizer = loaded.tokenizer
    context = loaded.model.config.context_length
    records = [dict(r) for r in records]
    prompts, stops = [], []
    for i, record in enumerate(records):
        where = f"record {i + 1}"
        if PREDICTION_FIELD in record:
            raise UserError(f"{where} already has a {PREDICTION_FIELD!r} field")
        ids, extra = prompt_ids(record, loaded, options.prompt_field, where)
        if len(ids) >= context:
            raise UserError(
                f"{where}: its prompt is {len(ids)} tokens, the model's context {context}: "
                "shorten it"
            )
        prompts.append(ids)
        stops.append([*options.stop, *extra])
    # The longest prompt bounds the new tokens every row may take in one shared cache.
    max_new = min(options.max_new_tokens, context - max(len(p) for p in prompts) + 1)

    def should_stop(row: int, new_ids: list[int]) -> bool:
        if not stops[row]:
            return False
        # Only the tail can hold a stop string that just completed; a token is at least
        # one byte, so this many tokens always cover the longest stop string.
        tail = tokenizer.decode(new_ids[-(4 * max(map(len, stops[row])) + 1) :])
        return cut_at_stop(tail, stops[row])[1]

    outputs = generate_batch(
        loaded.model,
        prompts,
        max_new_tokens=max_new,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        seed=options.seed,
        stop_token_ids=(tokenizer.eot_id,) if options.stop_at_eot else (),
        should_stop=should_stop,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id,
        batch_size=options.batch_size,
        on_batch=on_progress,
    )
    for record, new_ids, row_stops in zip(records, outputs, stops, strict=True):
        record[PREDICTION_FIELD] = cut_at_stop(tokenizer.decode(new_ids), row_stops)[0]
    return records


def write_predictions(path: str | Path, records: list[dict[str, Any]]) -> None:
    """JSONL, one record per line, written atomically."""
    from lmlab.fileio import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
