"""Corpora: turn the user's inputs into a stream of documents.

An input is one of:
  - a file: `.txt` / `.md` (text), `.jsonl` (one JSON object per line, text in a field);
    any other extension given explicitly is read as text;
  - a directory, searched recursively for `.txt`, `.md` and `.jsonl` files;
  - a glob such as `notes/**/*.md`;
  - a text sample shipped inside lmlab: `sample:shakespeare` (read as that text file, so
    it works offline on a fresh install);
  - a built-in practice language: `dsl:flowroll` or `dsl:dimmatch`, optionally
    `dsl:NAME:N` (N training programs) and `dsl:NAME:N:D` (difficulty D, e.g. `1-3`);
  - a Hugging Face dataset: `hf:NAME` (hub, streamed) or `hf:PATH` (a local dataset folder,
    a `save_to_disk` folder, or one data file: .parquet, .jsonl, .json, .csv, .arrow,
    .txt), read through `datasets`. A .parquet / .csv / .arrow file or a `save_to_disk`
    folder is recognised without the `hf:` too. When the dataset has a `validation` (or
    else a `test`) split besides the one read, it becomes the val split as it is, instead
    of holding out documents of the train split.

A document is what the end-of-document token separates: a text file (or, with
`doc_unit="paragraph"`, each paragraph of it), a JSONL record, a dataset row, a program.
Files that are binary or not UTF-8 are skipped and counted.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
DATA_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
"""Single data files `hf:FILE` reads, by suffix, and the `datasets` builder for each."""
DATASET_ONLY_SUFFIXES = (".parquet", ".csv", ".arrow")
"""Files that can only be datasets: read through `datasets` even without `hf:`."""
VAL_SPLITS = ("validation", "test")
HUB_HOST = "huggingface.co"
DEFAULT_DSL_PROGRAMS = 20_000
DEFAULT_DSL_DIFFICULTY = "1-3"
# A run of blank lines ends a paragraph; it stays with the paragraph it ends, so joining the
# paragraphs gives back the file exactly.
_BLANK_LINES = re.compile(r"(\n(?:[ \t]*\n)+)")


@dataclass
class Document:
    """One document and, for corpora that define their own split, where it belongs."""

    text: str
    split: str | None = None  # "train" | "val" | "test" | None (decided by the caller)
    source: int = 0  # which input it came from, in a mixture


@dataclass
class Skipped:
    """Inputs left out, by reason; reported once at the end."""

    binary: list[str] = field(default_factory=list)
    not_utf8: list[str] = field(default_factory=list)
    bad_records: int = 0

    def count(self) -> int:
        return len(self.binary) + len(self.not_utf8)

    def summary(self) -> str:
        parts = []
        if self.binary:
            parts.append(f"{len(self.binary)} binary (e.g. {self.binary[0]})")
        if self.not_utf8:
            parts.append(f"{len(self.not_utf8)} not UTF-8 (e.g. {self.not_utf8[0]})")
        text = f"skipped {self.count()} files: " + ", ".join(parts) if parts else ""
        if self.bad_records:
            text += (
                "; " if text else ""
            ) + f"skipped {self.bad_records} JSONL records without a text field"
        return text


def split_paragraphs(text: str) -> list[str]:
    """Split at blank lines, keeping every character: `"".join(result) == text`."""
    parts = _BLANK_LINES.split(text)  # [text, separator, text, separator, ..., text]
    paragraphs = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    if parts[-1]:
        paragraphs.append(parts[-1])
    return paragraphs


class Corpus:
    """A re-iterable collection of documents from one or more inputs."""

    def __init__(
        self,
        inputs: list[str],
        *,
        doc_unit: str = "auto",
        text_field: str = "text",
        hf_config: str | None = None,
        hf_split: str = "train",
        seed: int = 0,
        val_inputs: list[str] | None = None,
        hf_val_split: str = "validation",
        own_val_split: bool = True,
        val_split: str = "hash",
        val_fraction: float = 0.1,
    ):
        """`val_inputs`, when given, are the whole val split: every document of `inputs` is
        then a training document (a corpus's own val split, a practice language's or a
        dataset's, is left out) and none is held out by hash. `hf_val_split` is the split
        read from hf: val inputs. `own_val_split` False reads only the named split of a
        dataset (no val split beside it).

        `val_split="tail"` (file inputs only) holds out the last `val_fraction` of the text,
        as nanoGPT does: the characters of the files, in order, are cut once at
        (1 - val_fraction) of their total; the document the cut falls in is split there.
        The default, "hash", leaves each document's split to the caller (`split_of`)."""
        if val_split not in ("hash", "tail"):
            raise UserError(f"unknown --val-split {val_split!r}: use hash or tail")
        if not inputs:
            raise UserError(
                "no inputs given: pass --input PATH (files, folders, globs, dsl:NAME or hf:NAME)"
            )
        if doc_unit not in ("auto", "file", "paragraph"):
            raise UserError(f"unknown --doc-unit {doc_unit!r}: use auto, file or paragraph")
        self.text_field, self.hf_config, self.hf_split, self.seed = (
            text_field,
            hf_config,
            hf_split,
            seed,
        )
        self.files: list[Path] = []
        self.specials: list[str] = []  # dsl:... and hf:... inputs
        for spec in inputs:
            self._resolve(spec)
        if not self.files and not self.specials:
            raise UserError(f"no .txt, .md or .jsonl files found in {', '.join(inputs)}")
        text_files = [f for f in self.files if f.suffix.lower() not in JSONL_SUFFIXES]
        if doc_unit == "auto":
            # A handful of big files (one book, one dump) would give a val split of zero or
            # one document; paragraphs give a meaningful split. Many files: keep them whole.
            doc_unit = "paragraph" if 0 < len(text_files) < 100 else "file"
        self.doc_unit = doc_unit
        self.skipped = Skipped()
        self.own_val_split = own_val_split
        self.val_split, self.val_fraction = val_split, val_fraction
        if val_split == "tail" and (self.specials or val_inputs):
            raise UserError(
                "--val-split tail cuts file inputs: it takes no dsl:, hf: or --val-input inputs"
            )
        self.val: Corpus | None = None
        if val_inputs:
            self.val = Corpus(
                val_inputs,
                doc_unit=doc_unit,
                text_field=text_field,
                hf_config=hf_config,
                hf_split=hf_val_split,
                seed=seed,
                own_val_split=False,
            )

    def _resolve(self, spec: str) -> None:
        if spec.startswith("sample:"):
            from lmlab.data.samples import sample_names, sample_path

            if spec[7:] not in sample_names():
                raise UserError(
                    f"unknown sample {spec!r}: shipped samples are "
                    + ", ".join(f"sample:{n}" for n in sample_names())
                )
            self.files.append(sample_path(spec[7:] + ".txt"))
            return
        if spec.startswith("dsl:"):
            parse_dsl_spec(spec)  # validate now, fail before any work
            self.specials.append(spec)
            return
        if spec.startswith("hf:"):
            if not spec[3:]:
                raise UserError("hf: needs a dataset name or path, e.g. hf:roneneldan/TinyStories")
            self.specials.append(spec)
            return
        if (
            re.match(r"^[a-z]+:", spec)
            and not Path(spec).exists()
            and not re.match(r"^[A-Za-z]:[\\/]", spec)
        ):
            raise UserError(
                f"unknown corpus {spec!r}: built-in corpora are dsl:flowroll, dsl:dimmatch and "
                "sample:shakespeare; datasets are hf:NAME"
            )
        path = Path(spec).expanduser()
        if (path.is_file() and path.suffix.lower() in DATASET_ONLY_SUFFIXES) or _saved_dataset(
            path
        ):
            self.specials.append(f"hf:{spec}")  # a dataset file or folder, without the hf:
        elif path.is_file():
            self.files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
            if not found:
                raise UserError(
                    f"{spec}: no .txt, .md or .jsonl files in this folder (a dataset folder of "
                    f"parquet or arrow files: pass hf:{spec})"
                )
            self.files.extend(found)
        elif any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"{spec}: the pattern matches no files")
            self.files.extend(found)
        else:
            raise UserError(f"{spec}: no such file or folder")

    def total_file_bytes(self) -> int | None:
        """Bytes on disk of the file inputs (None when streamed inputs make it unknown)."""
        if self.specials:
            return None
        return sum(f.stat().st_size for f in self.files)

    def documents(self) -> Iterator[Document]:
        """Yield every document, in a deterministic order. Can be called more than once."""
        if self.val_split == "tail":
            yield from self._tail_split()
            return
        if self.val is None:
            yield from self._own_documents()
            return
        for doc in self._own_documents():
            if doc.split in (None, "train"):
                yield Document(doc.text, "train")
        for doc in self.val.documents():
            yield Document(doc.text, "val")
        for name in ("binary", "not_utf8"):
            getattr(self.skipped, name).extend(getattr(self.val.skipped, name))
        self.skipped.bad_records += self.val.skipped.bad_records

    def _tail_split(self) -> Iterator[Document]:
        """Documents before the cut train, after it validate; the one across it is split."""
        total = sum(len(d.text) for d in self._own_documents())
        cut = int(total * (1 - self.val_fraction))  # as nanoGPT: int(n * 0.9)
        seen = 0
        for doc in self._own_documents():
            start, seen = seen, seen + len(doc.text)
            if seen <= cut:
                yield Document(doc.text, "train")
            elif start >= cut:
                yield Document(doc.text, "val")
            else:
                yield Document(doc.text[: cut - start], "train")
                yield Document(doc.text[cut - start :], "val")

    def _own_documents(self) -> Iterator[Document]:
        self.skipped = Skipped()
        for spec in self.specials:
            yield from self._special_documents(spec)
        for path in self.files:
            yield from self._file_documents(path)

    def _read_text(self, path: Path) -> str | None:
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            self.skipped.binary.append(str(path))
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped.not_utf8.append(str(path))
            return None

    def _file_documents(self, path: Path) -> Iterator[Document]:
        text = self._read_text(path)
        if not text:
            return
        if path.suffix.lower() in JSONL_SUFFIXES:
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    value = json.loads(line).get(self.text_field)
                except (ValueError, AttributeError):
                    value = None
                if isinstance(value, str):
                    if value:
                        yield Document(value)
                else:
                    self.skipped.bad_records += 1
        elif self.doc_unit == "paragraph":
            for paragraph in split_paragraphs(text):
                yield Document(paragraph)
        else:
            yield Document(text)

    def _special_documents(self, spec: str) -> Iterator[Document]:
        if spec.startswith("dsl:"):
            yield from _dsl_documents(*parse_dsl_spec(spec), seed=self.seed)
        else:
            yield from _hf_documents(
                spec[3:], self.hf_config, self.hf_split, self.text_field, self.own_val_split
            )


def _dsl_documents(name: str, n_train: int, difficulty: str, seed: int) -> Iterator[Document]:
    """Training and validation programs of a practice language; its test split stays unseen."""
    from lmlab.data.dsl import generate_corpus, get_language, parse_difficulty

    lang = get_language(name)
    level = parse_difficulty(difficulty)
    n_val = max(100, n_train // 18)  # the languages' own split is 90/5/5
    for split, n in (("train", n_train), ("val", n_val)):
        for line in generate_corpus(lang, n, seed=seed, difficulty=level, split=split):
            yield Document(line, split)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the Hub cannot be reached (checked in at most 3 s):
    Hub lookups should then use only the local cache and fail at once, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError:
        return True
    return False


def _saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and (
        ((path / "dataset_info.json").is_file() and (path / "state.json").is_file())
        or (path / "dataset_dict.json").is_file()
    )


@contextlib.contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """`datasets` in offline mode inside the block when `offline` (it reads its flag when
    it looks a dataset up, so a Hub name that is not cached fails at once)."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _open_hf(name: str, config: str | None, split: str) -> tuple[object, object | None]:
    """(the split to read, the dataset's own validation split or None) of hf:NAME."""
    import datasets

    path = Path(name).expanduser()
    if _saved_dataset(path):
        dd = datasets.load_from_disk(str(path))
        if not isinstance(dd, datasets.DatasetDict):
            return dd, None
    elif path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(
                f"hf:{name}: a single data file must be one of {', '.join(DATA_FILE_BUILDERS)}"
            )
        if split != "train":
            raise UserError(f"hf:{name} is one file: it has only a train split, not {split!r}")
        dd = datasets.load_dataset(builder, data_files=str(path), streaming=True)
    else:
        with _datasets_offline(not path.exists() and hub_offline()):
            dd = datasets.load_dataset(str(path) if path.exists() else name, config, streaming=True)
    if split not in dd:
        raise UserError(f"dataset {name} has no split {split!r} (has: {', '.join(dd)})")
    val = next((dd[v] for v in VAL_SPLITS if v in dd and v != split), None)
    return dd[split], val


def _hf_documents(
    name: str, config: str | None, split: str, text_field: str, own_val_split: bool = True
) -> Iterator[Document]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UserError("hf: inputs need the `datasets` package: pip install 'lmlab[hf]'") from None
    try:
        train, val = _open_hf(name, config, split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types: offline, missing repo, bad config
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load dataset {name!r} (split {split!r}): {first}") from None
    # The dataset's own validation split, when it has one, is the val split as it is.
    if not own_val_split:
        val = None
    parts = [(train, None)] if val is None else [(train, "train"), (val, "val")]
    for ds, given in parts:
        for row in ds:
            value = row.get(text_field)
            if not isinstance(value, str):
                raise UserError(
                    f"dataset {name!r} rows have no text field {text_field!r} "
                    f"(fields: {', '.join(row)}): pass --text-field"
                )
            if value:
                yield Document(value, given)


def parse_dsl_spec(spec: str) -> tuple[str, int, str]:
    """`dsl:NAME[:PROGRAMS[:DIFFICULTY]]` -> (name, programs, difficulty), checked."""
    from lmlab.data.dsl import get_language

    parts = spec.split(":")
    if len(parts) > 4:
        raise UserError(f"bad corpus {spec!r}: expected dsl:NAME[:PROGRAMS[:DIFFICULTY]]")
    name = parts[1]
    get_language(name)  # raises UserError listing the valid names
    try:
        n = int(parts[2]) if len(parts) > 2 and parts[2] else DEFAULT_DSL_PROGRAMS
    except ValueError:
        raise UserError(f"bad program count in {spec!r}: expected e.g. dsl:{name}:20000") from None
    if n <= 0:
        raise UserError(f"bad program count in {spec!r}: must be positive")
    difficulty = parts[3] if len(parts) > 3 else DEFAULT_DSL_DIFFICULTY
    return name, n, difficulty
