"""Fine-tuning data: JSONL records -> token examples with a loss mask -> padded batches.

Formats, one JSON object per line and one format per file (other keys are ignored):

    {"prompt": "...", "completion": "..."}            loss on the completion
    {"messages": [{"role": ..., "content": ...}]}     loss on the assistant turns
    {"text": "..."}                                   loss on every token (continued pretraining)
    {"prompt": "...", "chosen": "...", "rejected": "..."}   a preference pair, for DPO

and `dsl:NAME[:N[:DIFFICULTY]]`, a practice language: prompt `PROGRAM =>`, completion
` RESULT`, from the language's own train and val programs.

    data = load_sft_splits("train.jsonl", val_fraction=0.05, seed=0)
    examples, stats = tokenize_records(data.train, tok, seq_len=512)
    loader = SFTLoader(examples, batch_size=8, seq_len=512, pad_id=pad_id_for(tok))
    x, y = loader.next_batch()        # (B, T) each; y is -100 where there is no loss
    logits, loss = model(x, y)

Labels are aligned with the inputs, as in Hugging Face: `Example.labels[i]` is
`input_ids[i]` where token i is learned and -100 where it is not. The batcher shifts:
x = input_ids[:-1], y = labels[1:]. An example holds at most seq_len + 1 tokens, so x and
y hold at most seq_len, like TokenLoader's windows.

Each example ends with the tokenizer's end-of-document token, learned after a completion
(the model learns to stop). Each piece of a record (prompt, completion, a chat turn's
header, content and end marker) is tokenized on its own, so a completion's tokens are the
ones the model must produce after the prompt encoded alone, as at generation time.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmlab.data.chat import (  # noqa: F401  (re-exported: the chat layout is part of this API)
    DEFAULT_CHAT_TEMPLATE,
    END_OF_TURN,
    ROLES,
    Message,
    Piece,
    PieceEncoder,
    default_chat_pieces,
    jinja_chat_pieces,
    read_chat_template,
    render_chat,
)
from lmlab.data.corpus import parse_dsl_spec
from lmlab.data.dsl import format_prompt, generate_corpus, split_line
from lmlab.data.prepare import split_of
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import UserError

IGNORE_INDEX = -100
"""Label of a position without loss (the model's cross-entropy ignores it)."""

RecordFormat = Literal["prompt_completion", "chat", "text", "preference"]
RECORD_FORMATS: tuple[str, ...] = typing.get_args(RecordFormat)
OnOverflow = Literal["truncate", "error"]
ON_OVERFLOW: tuple[str, ...] = typing.get_args(OnOverflow)
PadTo = Literal["longest", "seq_len"]
PAD_TO: tuple[str, ...] = typing.get_args(PadTo)


# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class PromptCompletion:
    """Learn `completion` after `prompt`."""

    prompt: str
    completion: str
    where: str = field(default="", compare=False)
    """FILE:LINE (or dsl:...:N) the record came from, for messages."""


@dataclass(frozen=True)
class Chat:
    """A conversation; learn the assistant turns."""

    messages: tuple[Message, ...]
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Text:
    """Plain text; learn all of it."""

    text: str
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred completion."""

    prompt: str
    chosen: str
    rejected: str
    where: str = field(default="", compare=False)


SFTRecord = PromptCompletion | Chat | Text


@dataclass
class RecordSet:
    """The records of one file, all of one format, and how many bad lines were skipped."""

    records: list[Any]
    format: str
    """One of RECORD_FORMATS."""
    bad_records: int = 0
    first_error: str | None = None
    """The first skipped line's error (FILE:LINE: what), to show the user."""


class _BadRecord(Exception):
    """A line that is not a valid record; the message says why (without FILE:LINE)."""


# A record's format is told by the keys only it has; "prompt" is shared by two formats.
_DISTINCTIVE_KEYS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("completion",),
    "chat": ("messages",),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
}


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _string(obj: Mapping[str, Any], key: str, name: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise _BadRecord(f"missing key {name!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise _BadRecord(f"{name!r} must be a string, got {_json_type(value)}")
    if not value and not allow_empty:
        raise _BadRecord(f"{name!r} is empty")
    return value


def _format_of(obj: dict[str, Any]) -> str:
    found = [fmt for fmt, keys in _DISTINCTIVE_KEYS.items() if any(k in obj for k in keys)]
    if len(found) > 1:
        raise _BadRecord(f"keys of several formats ({', '.join(found)}); keep one per record")
    if found:
        return found[0]
    if "prompt" in obj:
        return "prompt_completion"  # its completion is missing; the check below says so
    keys = ", ".join(sorted(obj)) or "none"
    raise _BadRecord(
        f"unknown record (keys: {keys}); expected prompt+completion, messages, text, "
        "or prompt+chosen+rejected"
    )


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise _BadRecord(f"'messages' must be a list, got {_json_type(value)}")
    if not value:
        raise _BadRecord("'messages' is empty")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _BadRecord(f"messages[{i}] must be an object, got {_json_type(m)}")
        role = _string(m, "role", f"messages[{i}].role")
        if role not in ROLES:
            raise _BadRecord(
                f"messages[{i}] has unknown role {role[:40]!r}; expected {', '.join(ROLES)}"
            )
        content = _string(m, "content", f"messages[{i}].content", allow_empty=True)
        messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        raise _BadRecord("no assistant turn: nothing to learn")
    return tuple(messages)


def _parse_line(line: str, where: str) -> tuple[str, Any]:
    """(format, record) of one JSONL line; raises _BadRecord."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRecord(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _BadRecord(f"expected a JSON object, got {_json_type(obj)}")
    fmt = _format_of(obj)
    if fmt == "prompt_completion":
        record: Any = PromptCompletion(
            _string(obj, "prompt", "prompt", allow_empty=True),
            _string(obj, "completion", "completion"),
            where,
        )
    elif fmt == "chat":
        record = Chat(_messages(obj["messages"]), where)
    elif fmt == "text":
        record = Text(_string(obj, "text", "text"), where)
    else:
        record = PreferencePair(
            _string(obj, "prompt", "prompt", allow_empty=True),
            _string(obj, "chosen", "chosen"),
            _string(obj, "rejected", "rejected"),
            where,
        )
    return fmt, record


def read_records(
    path: str | Path, skip_bad: bool = False, formats: Sequence[str] = RECORD_FORMATS
) -> RecordSet:
    """Validated records of a JSONL file whose format is one of `formats`.

    A bad line raises a one-line UserError naming FILE:LINE and what is wrong; with
    `skip_bad` it is skipped and counted instead. A file that mixes formats, holds a format
    not in `formats`, is empty, or has no good line is refused whatever `skip_bad` says.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    records: list[Any] = []
    file_format: str | None = None
    bad_records, first_error = 0, None
    # Decoded line by line, so a stray non-UTF-8 byte is one bad record, not a bad file.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            fmt, record = _parse_line(line, where)
        except UnicodeDecodeError as e:
            problem = f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1})"
        except _BadRecord as e:
            problem = f"{where}: {e}"
        else:
            if fmt not in formats:
                raise UserError(
                    f"{where}: a {fmt} record, but this file must hold {' or '.join(formats)} records"
                )
            if file_format is not None and fmt != file_format:
                raise UserError(
                    f"{where}: a {fmt} record in a file of {file_format} records; "
                    "use one format per file"
                )
            file_format = fmt
            records.append(record)
            continue
        if not skip_bad:
            raise UserError(problem)
        bad_records += 1
        first_error = first_error or problem
    if not records:
        if bad_records:
            raise UserError(f"{path}: no good records ({bad_records} bad); first: {first_error}")
        raise UserError(f"{path} is empty: expected one JSON object per line")
    return RecordSet(records, file_format, bad_records, first_error)


def read_sft_records(path: str | Path, skip_bad: bool = False) -> RecordSet:
    """Prompt/completion, chat or text records of a JSONL file (see `read_records`)."""
    return read_records(path, skip_bad, formats=("prompt_completion", "chat", "text"))


def read_preference_pairs(path: str | Path, skip_bad: bool = False) -> RecordSet:
    """Preference pairs {"prompt", "chosen", "rejected"} of a JSONL file (see `read_records`)."""
    return read_records(path, skip_bad, formats=("preference",))


def dsl_records(spec: str, split: str = "train", seed: int = 0) -> list[PromptCompletion]:
    """Prompt/completion records of `dsl:NAME[:N[:DIFFICULTY]]`'s `split` ("train" or "val").

    N counts training programs; val gets max(100, N // 18) programs, as `lmlab prepare`
    does (the languages split 90/5/5). The prompt is `PROGRAM =>` and the completion
    ` RESULT`, so prompt + completion is the corpus line.
    """
    name, n_train, difficulty = parse_dsl_spec(spec)  # one parser for dsl: specs
    n = n_train if split == "train" else max(100, n_train // 18)
    records = []
    for i, line in enumerate(generate_corpus(name, n, seed, difficulty, split=split)):
        program, result = split_line(line)
        records.append(
            PromptCompletion(format_prompt(program), " " + result, f"{spec}:{split}:{i}")
        )
    return records


def _record_key(record: Any) -> str:
    """The text a record's split is drawn from: its fields as canonical JSON."""
    fields = dataclasses.asdict(record)
    fields.pop("where")
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def split_records(records: Sequence[Any], val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, val): each record's side comes from a seeded hash of its content.

    Deterministic and independent of order, like `lmlab prepare`'s document split; two
    identical records always land on the same side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for record in records:
        side = split_of(_record_key(record), seed, val_fraction)
        (val if side == "val" else train).append(record)
    return train, val


@dataclass
class SFTSplits:
    """Training and validation records, and how many bad records were skipped."""

    train: list[SFTRecord]
    val: list[SFTRecord]
    bad_records: int = 0


def load_sft_splits(
    source: str | Path,
    val_source: str | Path | None = None,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    skip_bad: bool = False,
) -> SFTSplits:
    """Records of a JSONL file or `dsl:...` spec, split into train and val.

    Val comes from `val_source` when given; else, for a dsl source, from the language's
    own val programs; else from `split_records(records, val_fraction, seed)`.
    """

    def load(spec: str | Path, split: str) -> RecordSet:
        if str(spec).startswith("dsl:"):
            return RecordSet(dsl_records(str(spec), split, seed), "prompt_completion")
        return read_sft_records(spec, skip_bad)

    train = load(source, "train")
    if val_source is not None:
        val = load(val_source, "val")
        return SFTSplits(train.records, val.records, train.bad_records + val.bad_records)
    if str(source).startswith("dsl:"):
        return SFTSplits(train.records, load(source, "val").records)
    train_records, val_records = split_records(train.records, val_fraction, seed)
    return SFTSplits(train_records, val_records, train.bad_records)


# ---------------------------------------------------------------------------------------
# Tokenization


@dataclass
class Example:
    """Token ids and aligned labels: labels[i] is input_ids[i] if learned, else -100."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferenceExample:
    """Both sides of a preference pair; each starts with the same prompt tokens."""

    chosen: Example
    rejected: Example


@dataclass
class TokenizeStats:
    """What tokenization kept and changed."""

    examples: int = 0
    """Examples kept."""
    truncated: int = 0
    """Kept examples cut to seq_len + 1 tokens (their start kept)."""
    dropped: int = 0
    """Records left with no learned token (e.g. a completion truncated away entirely)."""


def pad_id_for(tokenizer: TextTokenizer) -> int:
    """The id to pad batches with: the pad token, else the end-of-document token.

    Any id works: pads are never learned and, right of the real tokens in a causal model,
    never seen by them.
    """
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id


def _pieces(
    record: SFTRecord, chat_template: str | None, variables: Mapping[str, str]
) -> list[Piece]:
    if isinstance(record, PromptCompletion):
        return [Piece(record.prompt, False), Piece(record.completion, True)]
    if isinstance(record, Text):
        return [Piece(record.text, True)]
    if isinstance(record, Chat):
        if chat_template is None:
            return default_chat_pieces(record.messages)
        return jinja_chat_pieces(chat_template, record.messages, variables, record.where)
    raise TypeError(f"not a fine-tuning record: {type(record).__name__}")


def _example(pieces: list[Piece], encode: PieceEncoder, eot_id: int) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        ids = encode(piece)
        input_ids += ids
        labels += ids if piece.trained else [IGNORE_INDEX] * len(ids)
    # The end-of-document token is learned when it follows learned text: stop after replying.
    last_learned = next((p.trained for p in reversed(pieces) if p.text), False)
    input_ids.append(eot_id)
    labels.append(eot_id if last_learned else IGNORE_INDEX)
    return Example(input_ids, labels)


def _fit(
    example: Example, seq_len: int, on_overflow: str, where: str
) -> tuple[Example | None, bool]:
    """(example cut to seq_len + 1 tokens or None if nothing is left to learn, was it cut)."""
    limit = seq_len + 1
    cut = len(example) > limit
    if cut:
        if on_overflow == "error":
            raise UserError(
                f"{where or 'a record'}: {len(example)} tokens, more than seq_len + 1 = {limit}; "
                "raise seq_len, shorten the record, or truncate (on_overflow='truncate')"
            )
        example = Example(example.input_ids[:limit], example.labels[:limit])
    # labels[0] is never a target: nothing comes before the first token to predict it.
    if all(label == IGNORE_INDEX for label in example.labels[1:]):
        return None, cut
    return example, cut


def _check_tokenize_args(seq_len: int, on_overflow: str) -> None:
    if on_overflow not in ON_OVERFLOW:
        raise UserError(f"on_overflow must be one of {', '.join(ON_OVERFLOW)}, got {on_overflow!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")


def _template_variables(tokenizer: TextTokenizer, template_vars: Mapping[str, str] | None) -> dict:
    id_to_token = tokenizer.tokenizer.id_to_token
    variables = {"eos_token": id_to_token(tokenizer.eot_id)}
    if tokenizer.pad_id is not None:
        variables["pad_token"] = id_to_token(tokenizer.pad_id)
    return variables | dict(template_vars or {})


def tokenize_records(
    records: Sequence[SFTRecord],
    tokenizer: TextTokenizer,
    seq_len: int,
    *,
    on_overflow: OnOverflow = "truncate",
    chat_template: str | None = None,
    template_vars: Mapping[str, str] | None = None,
) -> tuple[list[Example], TokenizeStats]:
    """Examples of at most seq_len + 1 tokens, in record order, and what happened to them.

    Chat records use `chat_template` (Jinja; its text is tokenized with special tokens
    read, as transformers does) or, when None, DEFAULT_CHAT_TEMPLATE (message content
    always plain text). `template_vars` (e.g. from `read_chat_template`) add to the
    tokenizer's eos_token / pad_token. Over-long examples keep their start
    (`on_overflow="truncate"`) or raise a UserError naming the record ("error"); those
    left with nothing to learn are dropped and counted.
    """
    _check_tokenize_args(seq_len, on_overflow)
    encode = PieceEncoder(tokenizer)
    variables = _template_variables(tokenizer, template_vars)
    examples, stats = [], TokenizeStats()
    for record in records:
        full = _example(_pieces(record, chat_template, variables), encode, tokenizer.eot_id)
        example, cut = _fit(full, seq_len, on_overflow, record.where)
        if example is None:
            stats.dropped += 1
            continue
        stats.truncated += cut
        examples.append(example)
    stats.examples = len(examples)
    return examples, stats


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: TextTokenizer,
    seq_len: int,
    *,
    on_overflow: OnOverflow = "truncate",
) -> tuple[list[PreferenceExample], TokenizeStats]:
    """Preference examples: each side is prompt + completion + end-of-document, loss on the
    completion and the end token. A pair is dropped if either side has nothing left to
    learn after truncation; `truncated` counts pairs with a side cut."""
    _check_tokenize_args(seq_len, on_overflow)
    encode = PieceEncoder(tokenizer)
    examples, stats = [], TokenizeStats()
    for pair in pairs:
        sides, cut_any = [], False
        for completion in (pair.chosen, pair.rejected):
            pieces = [Piece(pair.prompt, False), Piece(completion, True)]
            side, cut = _fit(
                _example(pieces, encode, tokenizer.eot_id), seq_len, on_overflow, pair.where
            )
            sides.append(side)
            cut_any |= cut
        if sides[0] is None or sides[1] is None:
            stats.dropped += 1
            continue
        stats.truncated += cut_any
        examples.append(PreferenceExample(sides[0], sides[1]))
    stats.examples = len(examples)
    return examples, stats


# ---------------------------------------------------------------------------------------
# Batching


def pad_batch(
    examples: Sequence[Example], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (B, T) int64: x = input_ids[:-1] right-padded with pad_id, y = labels[1:]
    right-padded with -100. T = `length`, or the longest example's when None."""
    T = max(len(e) - 1 for e in examples) if length is None else length
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        n = len(e) - 1
        x[row, :n] = torch.tensor(e.input_ids[:-1], dtype=torch.long)
        y[row, :n] = torch.tensor(e.labels[1:], dtype=torch.long)
    return x, y


def pad_pairs(
    pairs: Sequence[PreferenceExample], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen x, chosen y, rejected x, rejected y), all (B, T): both sides padded to one T,
    so a DPO step can run them as one batch of 2B rows (`torch.cat`)."""
    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
    if length is None:
        length = max(len(e) - 1 for e in chosen + rejected)
    return (*pad_batch(chosen, pad_id, length), *pad_batch(rejected, pad_id, length))


def _num_tokens(item: Example | PreferenceExample) -> int:
    if isinstance(item, PreferenceExample):
        return len(item.chosen) + len(item.rejected)
    return len(item)


class SFTLoader:
    """Shuffled, epoch-based padded batches of examples, with an exact, resumable cursor.

    Each epoch visits the examples in an order drawn from `seed` and the epoch number; the
    ragged end of an epoch is dropped, as in TokenLoader. With `world_size` processes, each
    global batch of batch_size * world_size examples is dealt out so that rank r takes its
    own slice. `pad_to="longest"` pads each batch to its longest example (less compute);
    "seq_len" always gives (B, seq_len) (one shape, which suits torch.compile).
    """

    def __init__(
        self,
        examples: Sequence[Example] | Sequence[PreferenceExample],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pad_to: PadTo = "longest",
    ):
        if pad_to not in PAD_TO:
            raise UserError(f"pad_to must be one of {', '.join(PAD_TO)}, got {pad_to!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.examples, self.batch_size, self.seq_len, self.pad_id = (
            examples,
            batch_size,
            seq_len,
            pad_id,
        )
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.pad_to = pad_to
        too_long = next((i for i, e in enumerate(examples) if self._longest(e) > seq_len + 1), None)
        if too_long is not None:
            raise UserError(
                f"example {too_long} has more than seq_len + 1 = {seq_len + 1} tokens; "
                "tokenize with the loader's seq_len"
            )
        self.num_examples = len(examples)
        self.num_tokens = sum(_num_tokens(e) for e in examples)
        self.global_batch = batch_size * world_size
        if self.num_examples < self.global_batch:
            raise UserError(
                f"too little data: {self.num_examples} examples, one batch needs "
                f"{self.global_batch}; use a smaller batch or more data"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    @staticmethod
    def _longest(item: Example | PreferenceExample) -> int:
        if isinstance(item, PreferenceExample):
            return max(len(item.chosen), len(item.rejected))
        return len(item)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_examples)
            else:
                self._order = np.arange(self.num_examples)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """This rank's example indices for the next batch; advances the cursor."""
        if self.position + self.global_batch > self.num_examples:
            self.epoch, self.position = self.epoch + 1, 0  # drop the ragged end of an epoch
        order = self._epoch_order()
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return order[start : start + self.batch_size]

    def _length(self) -> int | None:
        return self.seq_len if self.pad_to == "seq_len" else None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T) int64 on the CPU; y is -100 on prompts and padding."""
        batch = [self.examples[i] for i in self.next_indices()]
        return pad_batch(batch, self.pad_id, self._length())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; refuses a state from different data or sequence length."""
        for key in ("num_examples", "num_tokens", "seq_len", "seed"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume the data cursor: {key} was {state[key]}, now "
                    f"{getattr(self, key)} (the data or the sequence length changed)"
                )
        # As in TokenLoader, a different batch geometry deals out the same order anew.
        self.epoch, self.position = state["epoch"], state["position"]


class PreferenceLoader(SFTLoader):
    """SFTLoader over PreferenceExamples (same arguments, pairs in place of examples);
    batches are (chosen x, chosen y, rejected x, rejected y)."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Four (B, T) int64 tensors on the CPU; y is -100 on the prompt and padding."""
        batch = [self.examples[i] for i in self.next_indices()]
        return pad_pairs(batch, self.pad_id, self._length())
