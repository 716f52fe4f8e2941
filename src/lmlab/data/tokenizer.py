"""Tokenizers: byte-level BPE and char-level, both as Hugging Face `tokenizers` objects.

Both kinds are saved as a single `tokenizer.json` (plus a small `tokenizer_config.json`)
that `transformers.PreTrainedTokenizerFast` loads with identical ids.

Special tokens come first, so their ids are stable: `<|endoftext|>` = 0 separates
documents, `<|pad|>` = 1 pads batches; the char-level tokenizer adds `<|unk|>` = 2 for
characters it never saw in training.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import UserError
from lmlab.fileio import atomic_write_json, atomic_write_text

EOT = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
BPE_SPECIALS = (EOT, PAD)
CHAR_SPECIALS = (EOT, PAD, UNK)
MAX_VOCAB_SIZE = 1 << 20
# Names other tokenizers use for their end-of-document token, tried in order.
_EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = (PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what lmlab needs to know about it."""

    tokenizer: Tokenizer
    kind: str  # "bpe" | "char" | "external"
    eot_id: int
    pad_id: int | None

    def __post_init__(self) -> None:
        # Text that happens to contain "<|endoftext|>" must not forge a document boundary:
        # encode special-token strings found in text as ordinary text. (A runtime setting,
        # not saved in tokenizer.json.)
        self.tokenizer.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def unknown_characters(self, text: str) -> list[str]:
        """The characters of `text` that encode as `<|unk|>` (only a char-level vocabulary
        has them: byte-level BPE encodes every string)."""
        unk_id = self.tokenizer.token_to_id(UNK)
        if unk_id is None:
            return []
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        found = (
            text[a:b]
            for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
            if i == unk_id
        )
        return sorted(set(found))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def sha256(self) -> str:
        """Identity of the tokenizer: the hash of its canonical JSON."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Save `tokenizer.json` and `tokenizer_config.json` (for `transformers`) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self.to_json())
        id_to_token = self.tokenizer.id_to_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": id_to_token(self.eot_id),
            "lmlab_kind": self.kind,
        }
        if self.pad_id is not None:
            config["pad_token"] = id_to_token(self.pad_id)
        if self.kind == "char":
            config["unk_token"] = UNK
        atomic_write_json(directory / "tokenizer_config.json", config)
        return directory / "tokenizer.json"


def check_vocab_size(kind: str, vocab_size: int) -> None:
    """Refuse vocabulary sizes that cannot work, with a one-line reason."""
    minimum = 256 + len(BPE_SPECIALS) if kind == "bpe" else len(CHAR_SPECIALS) + 1
    if vocab_size < minimum:
        why = "256 bytes + 2 special tokens" if kind == "bpe" else "3 special tokens + 1 character"
        raise UserError(
            f"vocabulary size {vocab_size} is too small for {kind}: needs at least {minimum} ({why})"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"vocabulary size {vocab_size} is too large: at most {MAX_VOCAB_SIZE:,}")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE tokenizer (lossless on any UTF-8 text, like GPT-2's)."""
    check_vocab_size("bpe", vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIALS),
        # All 256 byte symbols are in the vocabulary whatever the corpus, so nothing is unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok, "bpe", eot_id=tok.token_to_id(EOT), pad_id=tok.token_to_id(PAD))


def train_char(texts: Iterable[str], vocab_size: int = MAX_VOCAB_SIZE) -> TextTokenizer:
    """Train a char-level tokenizer: one id per character, the most frequent `vocab_size - 3`.

    Characters outside the vocabulary map to `<|unk|>` (so char-level is lossless only on
    characters seen in training). Built as a BPE model with no merges, so it is a plain
    `tokenizer.json` that `transformers` loads.
    """
    check_vocab_size("char", vocab_size)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    if not counts:
        raise UserError("cannot train a char tokenizer on an empty corpus")
    # Most frequent first; ties broken by code point so training is deterministic.
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - len(CHAR_SPECIALS)]
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS)}
    for c in sorted(chars):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(CHAR_SPECIALS))
    return TextTokenizer(tok, "char", eot_id=vocab[EOT], pad_id=vocab[PAD])


def from_tokenizer(
    tok: Tokenizer, kind: str = "external", eot_token: str | None = None
) -> TextTokenizer:
    """Wrap an existing `tokenizers.Tokenizer`, finding its end-of-document and pad tokens."""
    vocab = tok.get_vocab(with_added_tokens=True)
    candidates = (eot_token,) if eot_token else _EOT_CANDIDATES
    eot = next((t for t in candidates if t in vocab), None)
    if eot is None:
        raise UserError(
            "the tokenizer has no end-of-document token (looked for "
            + ", ".join(candidates)
            + "): pass one with --eot-token"
        )
    pad = next((t for t in _PAD_CANDIDATES if t in vocab), None)
    if kind == "external":
        lmlab_kind = tok.decoder is not None and type(tok.decoder).__name__
        kind = {"Fuse": "char", "ByteLevel": "bpe"}.get(lmlab_kind or "", "external")
    return TextTokenizer(tok, kind, eot_id=vocab[eot], pad_id=vocab[pad] if pad else None)


def load_tokenizer(path_or_name: str | Path, eot_token: str | None = None) -> TextTokenizer:
    """Load a `tokenizer.json`, a directory holding one, or a Hugging Face Hub name (online)."""
    path = Path(path_or_name)
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        if eot_token is None:
            eot_token = _eos_from_config(path / "tokenizer_config.json")
        path = file
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise UserError(f"{path} is not a valid tokenizer.json: {e}") from None
        return from_tokenizer(tok, eot_token=eot_token)
    name = str(path_or_name)
    if name.endswith(".json") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"tokenizer path {name} does not exist")
    try:
        tok = Tokenizer.from_pretrained(name)
    except Exception as e:
        raise UserError(
            f"could not load tokenizer {name!r} from the Hugging Face Hub "
            f"(offline, or no such repo?): {str(e).splitlines()[0][:200]}"
        ) from None
    return from_tokenizer(tok, eot_token=eot_token)


def _eos_from_config(config_path: Path) -> str | None:
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):  # older transformers saved AddedToken dicts
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def parse_train_spec(spec: str) -> tuple[str, int] | None:
    """`bpe:N`, `char` or `char:N` -> (kind, vocab_size); anything else -> None (a path or name)."""
    kind, _, size = spec.partition(":")
    if kind not in ("bpe", "char"):
        return None
    if not size:
        if kind == "bpe":
            raise UserError("bpe needs a vocabulary size, e.g. --tokenizer bpe:4096")
        return kind, MAX_VOCAB_SIZE
    try:
        vocab_size = int(size.replace("_", ""))
    except ValueError:
        raise UserError(
            f"bad vocabulary size in tokenizer spec {spec!r}: expected e.g. bpe:4096"
        ) from None
    check_vocab_size(kind, vocab_size)
    return kind, vocab_size


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a tokenizer of `kind` ("bpe" or "char")."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "char":
        return train_char(texts, vocab_size)
    raise UserError(f"unknown tokenizer kind {kind!r}: use bpe or char")
