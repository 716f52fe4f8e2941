"""`lmlab prepare`: documents -> tokenizer -> train/val token shards + manifest.

The main process reads documents in batches of about a megabyte and assigns each to train
or val by a hash of its text (so the split does not depend on input order, and duplicates
never straddle it). Worker processes, one per core, each run a single-threaded encoder and
turn its output into numpy arrays with an end-of-document token after every document; the
main process writes the arrays in input order. Processes rather than threads, because
turning encodings into Python id lists holds the GIL and costs ~15% of the encode itself.

With token caps or a weighted mixture of inputs (lmlab.data.mixture), the workers also
report each document's token count and input, and the main process writes a document only
while its input is under its target.

Everything is written into DATA_DIR.partial, renamed to DATA_DIR only when complete: a
failure leaves no output. An interrupted prepare (Ctrl-C, kill -9, a power cut) leaves the
.partial folder with `progress.json`: how many input documents are in the shards, and where
each shard writer stood, synced to disk about once a second. `--resume` (the same command)
cuts the open shards back to that record, skips those documents and goes on; the input
order is deterministic, so the shards end byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab import __version__
from lmlab.data.corpus import Corpus, Document
from lmlab.data.frames import FRAME_TOKENS, CompressedShardWriter, load_codec
from lmlab.data.mixture import END, MixedDocuments, TokenBudget, parse_inputs
from lmlab.data.shards import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ShardWriter,
    dtype_for_vocab,
    load_manifest,
    open_split,
)
from lmlab.data.tokenizer import TextTokenizer, load_tokenizer, parse_train_spec, train_tokenizer
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_json, hide_directory
from lmlab.processes import die_with_parent

PROGRESS_NAME = "progress.json"
HASHES_PART = "doc_hashes.part"
PROGRESS_EVERY_S = 1.0
# Small enough that the last batches keep every worker busy to the end (the tail is where a
# pool loses to one multi-threaded encode_batch call), large enough to amortise the IPC.
BATCH_CHARS = 1 << 18
# Very long documents are encoded in pieces so the parallel encoder has work for every core.
PIECE_CHARS = 1 << 16
DEFAULT_SHARD_TOKENS = 100_000_000
# Forking is much cheaper than starting fresh interpreters; it is safe on Linux here because
# workers only run the encoder. macOS and Windows use spawn (fork is unsafe or missing there).
MP_START = "fork" if sys.platform == "linux" else "spawn"


def split_of(text: str | bytes, seed: int, val_fraction: float) -> str:
    """Deterministic document-level split: a seeded BLAKE2b hash of the text vs. the fraction.

    (A CRC would be cheaper but its top bits barely change between near-identical short
    documents, which then all land on the same side.) The seed goes into BLAKE2b's salt,
    which costs nothing extra, unlike a key.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    digest = hashlib.blake2b(
        data, digest_size=8, salt=seed.to_bytes(16, "little", signed=True)
    ).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2**64 else "train"


def content_hash(data: bytes) -> int:
    """A document's identity for de-duplication: 64 bits of BLAKE2b of its UTF-8 text."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _pieces(text: str) -> list[str]:
    if len(text) <= PIECE_CHARS:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)  # cut after a newline where possible
            end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


@dataclass
class _Batch:
    texts: list[str]
    splits: list[str | None]  # a corpus's own split, or None: decided by hash in the worker
    sources: list[int]  # the input of each document (a mixture's index; -1: --val-input)
    chars: int = 0


def _batches(docs: Iterable[Document]) -> Iterator[_Batch]:
    batch = _Batch([], [], [])
    for doc in docs:
        batch.texts.append(doc.text)
        batch.splits.append(doc.split)
        batch.sources.append(doc.source)
        batch.chars += len(doc.text)
        if batch.chars >= BATCH_CHARS:
            yield batch
            batch = _Batch([], [], [])
    if batch.texts:
        yield batch


@dataclass
class _Encoded:
    """A worker's result for one batch: tokens and counts per split, in document order."""

    tokens: dict[str, np.ndarray]
    documents: dict[str, int]
    text_bytes: dict[str, int]
    per_doc: list[tuple[str, int, int, int, int]] | None = None
    """With a budget or --append: (split, tokens, input, bytes, content hash) of
    each document, in input order (so that caps apply in the order the documents came)."""
    hashes: list[int] | None = None
    """The content hash of each document written (all of them without `per_doc`)."""


_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    die_with_parent()  # a killed prepare leaves no workers behind
    # One process per core already; the encoder's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker_tokenizer.encode_special_tokens = True  # as TextTokenizer does


def _encode_batch(
    batch: _Batch,
    eot_id: int,
    dtype: np.dtype,
    seed: int,
    val_fraction: float,
    per_doc: bool = False,
) -> _Encoded:
    """Split, encode and flatten one batch (runs in a worker process); `per_doc` also
    reports each document's token count, input, bytes and content hash."""
    pieces: dict[str, list[str]] = {"train": [], "val": []}
    ends_doc: dict[str, list[bool]] = {"train": [], "val": []}
    documents = {"train": 0, "val": 0}
    text_bytes = {"train": 0, "val": 0}
    order: list[tuple[str, int, int, int]] = []  # (split, input, bytes, hash)
    for text, given, source in zip(batch.texts, batch.splits, batch.sources, strict=True):
        if given == END:  # an input's end, passed on to the writer in its place
            order.append((END, source, 0, 0))
            continue
        data = text.encode("utf-8")
        split = given or split_of(data, seed, val_fraction)
        if split not in pieces:
            continue  # a practice language's test programs stay unseen
        documents[split] += 1
        text_bytes[split] += len(data)
        parts = _pieces(text)
        pieces[split] += parts
        ends_doc[split] += [False] * (len(parts) - 1) + [True]
        order.append((split, source, len(data), content_hash(data)))
    tokens, eot = {}, (eot_id,)
    doc_tokens: dict[str, Iterator[int]] = {}
    for split in ("train", "val"):
        encodings = _worker_tokenizer.encode_batch_fast(pieces[split], add_special_tokens=False)
        ids = [e.ids for e in encodings]  # each .ids builds a new list: read it once
        chained = itertools.chain.from_iterable(
            itertools.chain(i, eot) if end else i
            for i, end in zip(ids, ends_doc[split], strict=True)
        )
        count = sum(map(len, ids)) + documents[split]  # known size: one allocation
        tokens[split] = np.fromiter(chained, dtype=dtype, count=count)
        if per_doc:
            counts, n = [], 0
            for i, end in zip(ids, ends_doc[split], strict=True):
                n += len(i)
                if end:
                    counts.append(n + 1)  # with its end-of-document token
                    n = 0
            doc_tokens[split] = iter(counts)
    report = (
        [(split, 0 if split == END else next(doc_tokens[split]), *rest) for split, *rest in order]
        if per_doc
        else None
    )
    return _Encoded(tokens, documents, text_bytes, report, [o[-1] for o in order if o[0] != END])


def _progress(enabled: bool):
    """Documents, tokens, MB read, MB/s, tokens/s, elapsed and (when the end is known: the
    file inputs' size, or --max-tokens) the time left."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]tokenizing"),
        BarColumn(),
        TextColumn("{task.fields[docs]:,} docs"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TextColumn("{task.fields[mb]:,.1f}{task.fields[total_mb]} MB"),
        TextColumn("{task.fields[mb_per_s]:.2f} MB/s"),
        TextColumn("{task.fields[tokens_per_s]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer: str | TextTokenizer = "bpe:4096",
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    doc_unit: str = "auto",
    text_field: str = "text",
    hf_config: str | None = None,
    hf_split: str = "train",
    val_inputs: list[str] | None = None,
    hf_val_split: str = "validation",
    val_split: str = "hash",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    compress: str | None = None,
    overwrite: bool = False,
    eot_token: str | None = None,
    max_tokens: int | None = None,
    max_input_tokens: int | None = None,
    resume: bool = False,
    append: bool = False,
    progress: bool = False,
    log=print,
) -> dict[str, Any]:
    """Tokenize `inputs` into train/val shards under `out`; returns the manifest.

    `tokenizer` is a spec (`bpe:N`, `char`, `char:N` train one on the training documents;
    a `tokenizer.json`, a folder holding one, or a Hub name load one) or a TextTokenizer.
    An input `PATH@WEIGHT` weighs it in a mixture; `max_tokens` caps the tokens written in
    all, `max_input_tokens` those of each input (lmlab.data.mixture). `resume` continues
    a prepare of the same arguments that was stopped (see the module docstring).
    `compress` ("lz4" or "zstd") writes shards of compressed frames (lmlab.data.frames).
    `append` adds the inputs' documents to the data directory `out` (`_append_into`),
    skipping those it already holds.
    """
    out = Path(out)
    work = _work_folder(out)
    settings = {
        "inputs": list(inputs),
        "tokenizer": tokenizer if isinstance(tokenizer, str) else f"given {tokenizer.sha256()}",
        "val_fraction": val_fraction,
        "seed": seed,
        "doc_unit": doc_unit,
        "text_field": text_field,
        "hf_config": hf_config,
        "hf_split": hf_split,
        "val_inputs": val_inputs,
        "hf_val_split": hf_val_split,
        "val_split": val_split,
        "shard_tokens": shard_tokens,
        "compress": compress,
        "eot_token": eot_token,
        "max_tokens": max_tokens,
        "max_input_tokens": max_input_tokens,
    }

    inputs, weights = parse_inputs(inputs)
    budget = TokenBudget(inputs, weights, max_tokens, max_input_tokens)
    if budget.active and val_split == "tail":
        raise UserError("--val-split tail cuts whole files: it takes no token caps or weights")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if compress is not None:
        load_codec(compress)  # an unknown name or a missing package fails before any work
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    existing = None
    if append:
        if resume or overwrite:
            raise UserError(
                "--append adds to a data directory: it takes no --resume or --overwrite"
            )
        existing = load_manifest(out)  # one line if it is not a data directory
        if compress is not None and compress != existing.get("compression"):
            raise UserError(
                f"{out} holds {existing.get('compression') or 'raw'} shards: --append writes the "
                "same kind, drop --compress"
            )
        compress = existing.get("compression")  # new shards are written as the old ones
    elif out.exists() and not overwrite:
        raise UserError(
            f"{out} already exists: choose another --out, pass --overwrite, or --append to add to it"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    saved = _resumable(work, settings) if resume else None
    if work.exists() and not resume and not append:
        raise UserError(
            f"{work} holds a prepare that was stopped: continue it with the same command and "
            "--resume, or delete that folder"
        )
    corpus = Corpus(
        inputs,
        doc_unit=doc_unit,
        text_field=text_field,
        hf_config=hf_config,
        hf_split=hf_split,
        seed=seed,
        val_inputs=val_inputs,
        hf_val_split=hf_val_split,
        val_split=val_split,
        val_fraction=val_fraction,
    )
    documents = corpus.documents
    if budget.active:
        per_input = [
            Corpus(
                [spec],
                doc_unit=corpus.doc_unit,
                text_field=text_field,
                hf_config=hf_config,
                hf_split=hf_split,
                seed=seed,
                val_split=val_split,
                val_fraction=val_fraction,
            )
            for spec in inputs
        ]
        documents = None  # a _BudgetedStream, made once the tokenizer is known
    started = time.perf_counter()

    tokenizer_spec = tokenizer if isinstance(tokenizer, str) else "given"
    if saved is not None:  # the tokenizer the stopped prepare trained or loaded
        tok = load_tokenizer(work / "tokenizer.json")
    elif existing is not None:  # appending: the data directory's own tokenizer
        tok = load_tokenizer(out / existing["tokenizer"]["file"])
        tokenizer_spec = existing["tokenizer"]["spec"]
    elif isinstance(tokenizer, str):
        train_spec = parse_train_spec(tokenizer)
        if train_spec is None:
            tok = load_tokenizer(tokenizer, eot_token=eot_token)
        else:
            kind, vocab_size = train_spec
            # BPE merges are learned from the training documents only; a char vocabulary is
            # just the alphabet, taken from every document so val has no unknown characters.
            log(
                f"training a {kind} tokenizer on the {'training ' if kind == 'bpe' else ''}documents"
            )
            tokenizer_docs = (
                _limited(_BudgetedStream(per_input, budget.copy(), corpus), budget.chars_to_read())
                if budget.active
                else corpus.documents()
            )
            train_texts = (
                d.text
                for d in tokenizer_docs
                if kind == "char" or (d.split or split_of(d.text, seed, val_fraction)) == "train"
            )
            tok = train_tokenizer(kind, train_texts, vocab_size)
    else:
        tok = tokenizer
    tokenizer_s = time.perf_counter() - started
    dtype = dtype_for_vocab(tok.vocab_size)

    folder = (
        _append_folder(out)
        if append
        else _partial(work, out, overwrite, keep=saved is not None, log=log)
    )
    with folder as tmp:
        if saved is None and not append:
            tok.save(tmp)
        counts = {s: {"documents": 0, "text_bytes": 0} for s in ("train", "val")}
        writers = {
            s: ShardWriter(
                tmp,
                s,
                dtype,
                shard_tokens,
                first_index=len(existing["splits"][s]["shards"]) if existing else 0,
            )
            if compress is None  # --compress: frames with an index (lmlab.data.frames)
            else CompressedShardWriter(
                tmp,
                s,
                dtype,
                shard_tokens,
                compress,
                frame_tokens=existing["frame_tokens"] if existing else FRAME_TOKENS,
                first_index=len(existing["splits"][s]["shards"]) if existing else 0,
            )
            for s in ("train", "val")
        }
        done = _Done(tmp, settings, record=not append)
        hashes = DocHashes(_known_hashes(out, existing), dedup=append, part=tmp / HASHES_PART)
        if saved is not None:
            for split, writer in writers.items():
                writer.restore(saved["writers"][split])
            counts, done.documents = saved["counts"], saved["documents"]
            hashes.restore(saved["hashes"])
            if budget.active:
                budget.load_state_dict(saved["budget"])
            log(f"resuming: {done.documents:,} documents already in the shards of {tmp}")
        if budget.active:
            documents = _BudgetedStream(
                per_input, budget, corpus, tok, start=saved["position"] if saved else None
            )
        else:
            documents = _Skipped(corpus.documents(), done.documents)
        encode_started = time.perf_counter()
        total_bytes = None if budget.active else corpus.total_file_bytes()
        workers = max(1, min(os.cpu_count() or 1, 8))
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context(MP_START),
            initializer=_init_worker,
            initargs=(tok.to_json(),),
        )
        with pool:
            # Start the workers now, before the progress bar's refresh thread exists: forking
            # a process that has other threads running is what makes fork unsafe.
            pool.submit(int).result()
            with _progress(progress) as bar:
                by_tokens = budget.total_cap()
                task = bar.add_task(
                    "tokenize",
                    total=by_tokens or (total_bytes or 0) / 1e6 or None,
                    total_mb=f"/{total_bytes / 1e6:,.0f}" if total_bytes else "",
                    docs=0,
                    tokens=0,
                    mb=0.0,
                    mb_per_s=0.0,
                    tokens_per_s=0.0,
                )
                in_flight: collections.deque = collections.deque()
                args = (tok.eot_id, dtype, seed, val_fraction, budget.active or append)

                def write_oldest() -> None:
                    future, n_docs, position = in_flight.popleft()
                    _write_result(future.result(), writers, counts, budget, hashes)
                    _update(bar, task, counts, writers, encode_started, by_tokens is not None)
                    done.add(n_docs, writers, counts, hashes, budget, position)

                for batch in _batches(documents):
                    future = pool.submit(_encode_batch, batch, *args)
                    in_flight.append((future, len(batch.texts), documents.position()))
                    # Keep every worker busy, but bound memory; write results in input order.
                    while len(in_flight) > 2 * workers:
                        write_oldest()
                while in_flight:
                    write_oldest()
        encode_s = time.perf_counter() - encode_started
        if budget.active:
            for sub in per_input:  # what each input's reader skipped
                corpus.skipped.binary += sub.skipped.binary
                corpus.skipped.not_utf8 += sub.skipped.not_utf8
                corpus.skipped.bad_records += sub.skipped.bad_records
        shards = {s: w.close() for s, w in writers.items()}

        if corpus.skipped.summary():
            log(f"warning: {corpus.skipped.summary()}")
        if existing is not None:
            return _append_into(out, tmp, existing, shards, counts, hashes, list(inputs), log)
        if counts["train"]["documents"] + counts["val"]["documents"] == 0:
            raise UserError(
                "no text found in the inputs"
                + (f" ({corpus.skipped.summary()})" if corpus.skipped.summary() else "")
            )
        if counts["train"]["documents"] == 0:
            raise UserError("every document fell into the val split: lower --val-fraction")
        if val_inputs and counts["val"]["documents"] == 0:
            raise UserError(f"--val-input {' '.join(val_inputs)} holds no documents")
        if val_fraction > 0 and counts["val"]["documents"] == 0:
            raise UserError(
                f"no document fell into the val split ({counts['train']['documents']} documents): "
                "use --doc-unit paragraph, more data, or --val-fraction 0"
            )
        manifest = {
            "format": "lmlab-token-shards",
            "version": MANIFEST_VERSION,
            "created_by": f"lmlab {__version__}",
            "dtype": dtype.name,
            **({"compression": compress, "frame_tokens": FRAME_TOKENS} if compress else {}),
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": tok.sha256(),
                "kind": tok.kind,
                "spec": tokenizer_spec,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "pad_id": tok.pad_id,
            },
            "splits": {
                s: {**counts[s], "tokens": sum(e["tokens"] for e in shards[s]), "shards": shards[s]}
                for s in ("train", "val")
            },
            "source": {
                "inputs": list(inputs),
                **({"val_inputs": list(val_inputs)} if val_inputs else {}),
                "doc_unit": corpus.doc_unit,
                "val_fraction": val_fraction,
                "val_split": "inputs" if val_inputs else val_split,
                "seed": seed,
                "skipped_files": corpus.skipped.count(),
                "skipped_records": corpus.skipped.bad_records,
                **(
                    {
                        "max_tokens": max_tokens,
                        "max_input_tokens": max_input_tokens,
                        "mixture": budget.report(),
                    }
                    if budget.active
                    else {}
                ),
            },
            "timing_s": {"tokenizer": round(tokenizer_s, 3), "encode": round(encode_s, 3)},
        }
        manifest["revision"] = 1
        manifest["history"] = [_history_entry(1, inputs, counts, shards, hashes)]
        manifest["doc_hashes"] = "doc_hashes.r1.npy"
        hashes.save(tmp, manifest["doc_hashes"])
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        done.finish()
    return manifest


class _Skipped:
    """The documents after the first `n` (those a resumed prepare already wrote)."""

    def __init__(self, docs: Iterable[Document], n: int):
        self.docs, self.n = docs, n

    def __iter__(self) -> Iterator[Document]:
        return itertools.islice(self.docs, self.n, None)

    def position(self) -> None:
        return None  # the documents count is the position


def _known_hashes(out: Path, existing: dict[str, Any] | None) -> np.ndarray | None:
    if existing is None or not existing.get("doc_hashes"):
        return None
    return np.load(out / existing["doc_hashes"], allow_pickle=False)


def _history_entry(
    revision: int, inputs: list[str], counts: dict, shards: dict, hashes: DocHashes
) -> dict[str, Any]:
    return {
        "revision": revision,
        "inputs": list(inputs),
        "documents": sum(c["documents"] for c in counts.values()),
        "tokens": sum(e["tokens"] for entries in shards.values() for e in entries),
        "duplicates_skipped": hashes.duplicates,
        "shards": [e["file"] for entries in shards.values() for e in entries],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def _append_folder(out: Path) -> Iterator[Path]:
    """A temporary folder inside DATA_DIR for the new shards; removed however it ends (and,
    after a kill, by the next append)."""
    for leftover in out.glob(".append-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".append-", suffix=".tmp", dir=out))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _append_into(
    out: Path,
    tmp: Path,
    existing: dict[str, Any],
    shards: dict[str, list[dict[str, Any]]],
    counts: dict,
    hashes: DocHashes,
    inputs: list[str],
    log,
) -> dict[str, Any]:
    """Move the new shards into DATA_DIR and write its next manifest revision. Existing
    shards are not touched; the manifest, written last, is what makes the new ones part of
    the data (a crash before it leaves files no manifest lists, replaced by the next append)."""
    added = sum(c["documents"] for c in counts.values())
    if added == 0:
        raise UserError(
            f"nothing to add: every document of {', '.join(inputs)} is already in {out}"
            + (f" ({hashes.duplicates:,} duplicates)" if hashes.duplicates else "")
        )
    revision = existing.get("revision", 1) + 1
    manifest = json.loads(json.dumps(existing))  # a deep copy
    for split in ("train", "val"):
        for entry in shards[split]:
            os.replace(tmp / entry["file"], out / entry["file"])
        info = manifest["splits"][split]
        info["shards"] = info["shards"] + shards[split]
        info["tokens"] += sum(e["tokens"] for e in shards[split])
        info["documents"] += counts[split]["documents"]
        info["text_bytes"] += counts[split]["text_bytes"]
    old_hashes = existing.get("doc_hashes")
    manifest["revision"] = revision
    manifest["doc_hashes"] = f"doc_hashes.r{revision}.npy"
    hashes.save(out, manifest["doc_hashes"])
    manifest.setdefault("history", [])
    manifest["history"].append(_history_entry(revision, inputs, counts, shards, hashes))
    atomic_write_json(out / MANIFEST_NAME, manifest)
    if old_hashes and old_hashes != manifest["doc_hashes"]:
        (out / old_hashes).unlink(missing_ok=True)
    log(
        f"appended {added:,} documents to {out} (revision {revision})"
        + (f"; {hashes.duplicates:,} already there were skipped" if hashes.duplicates else "")
    )
    return manifest


def _work_folder(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class _Done:
    """How far a prepare is, recorded in WORK/progress.json about once a second: documents
    of the input stream whose tokens are in the shards, and the writers' state."""

    def __init__(self, work: Path, settings: dict[str, Any], record: bool = True):
        self.work, self.settings, self.record = work, settings, record
        self.documents, self.saved_at = 0, 0.0

    def add(
        self,
        n_docs: int,
        writers: dict[str, ShardWriter],
        counts: dict,
        hashes: DocHashes,
        budget: TokenBudget,
        position: dict[str, Any] | None,
    ) -> None:
        """After writing a batch: `position` is where reading stood right after it."""
        self.documents += n_docs
        if self.record and time.monotonic() - self.saved_at >= PROGRESS_EVERY_S:
            record = {
                "settings": self.settings,
                "documents": self.documents,
                "counts": counts,
                "writers": {split: w.state() for split, w in writers.items()},
                "hashes": hashes.sync(),
                "budget": budget.state_dict(),
                "position": position,
            }
            atomic_write_json(self.work / PROGRESS_NAME, record)
            self.saved_at = time.monotonic()

    def finish(self) -> None:
        (self.work / PROGRESS_NAME).unlink(missing_ok=True)
        (self.work / HASHES_PART).unlink(missing_ok=True)


def _resumable(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The progress record of a stopped prepare with the same settings, or a UserError."""
    path = work / PROGRESS_NAME
    if not path.is_file():
        raise UserError(
            f"nothing to resume: {path} does not exist (a stopped prepare leaves it once it "
            "has written tokens); run the command without --resume"
        )
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is damaged: delete {work} and start again") from None
    for key, value in settings.items():
        if saved["settings"].get(key) != value:
            raise UserError(
                f"cannot resume: {key} was {saved['settings'].get(key)!r} in the stopped "
                f"prepare, now {value!r}; run the same command with --resume"
            )
    return saved


@contextlib.contextmanager
def _partial(work: Path, out: Path, overwrite: bool, keep: bool, log) -> Iterator[Path]:
    """The folder a prepare writes in (WORK = OUT.partial), renamed to OUT when complete.
    Ctrl-C keeps it (to --resume), as a kill does; any other failure removes it."""
    if not keep:
        work.mkdir(parents=True)
    try:
        yield work
    except KeyboardInterrupt:
        if (work / PROGRESS_NAME).is_file():
            log(
                f"stopped: the work so far is in {work}; the same command with --resume continues it"
            )
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
        old = hide_directory(out)
        os.replace(work, out)
        shutil.rmtree(old.parent, ignore_errors=True)
    else:
        os.replace(work, out)


class _BudgetedStream:
    """The inputs' documents as the budget mixes them (with their END markers); then
    --val-input's, outside the budget. `position()` says where reading stands; `start`
    continues from such a position."""

    def __init__(
        self,
        per_input: list[Corpus],
        budget: TokenBudget,
        corpus: Corpus,
        tokenizer=None,
        start: dict[str, Any] | None = None,
    ):
        self.mixed = MixedDocuments(
            per_input, budget, tokenizer, start=start["mixture"] if start else None
        )
        self.corpus = corpus
        self.val_docs = start["val_docs"] if start else 0

    def position(self) -> dict[str, Any]:
        return {"mixture": self.mixed.position(), "val_docs": self.val_docs}

    def __iter__(self) -> Iterator[Document]:
        val = self.corpus.val
        if self.val_docs == 0:  # the mixture is not over yet
            for doc in self.mixed:
                if val is None or doc.split == END:
                    yield doc
                elif doc.split in (None, "train"):  # --val-input is the whole val split
                    yield Document(doc.text, "train", doc.source)
        if val is not None:
            for doc in itertools.islice(val.documents(), self.val_docs, None):
                self.val_docs += 1
                yield Document(doc.text, "val", source=-1)


def _limited(docs: Iterable[Document], max_chars: int | None) -> Iterator[Document]:
    """The documents until `max_chars` characters (None: all)."""
    seen = 0
    for doc in docs:
        if max_chars is not None and seen >= max_chars:
            return
        if doc.split == END:
            continue
        seen += len(doc.text)
        yield doc


def _write_result(
    result: _Encoded,
    writers: dict[str, ShardWriter],
    counts: dict,
    budget: TokenBudget,
    hashes: DocHashes,
) -> None:
    if result.per_doc is None:
        for split, tokens in result.tokens.items():
            writers[split].write(tokens)
            counts[split]["documents"] += result.documents[split]
            counts[split]["text_bytes"] += result.text_bytes[split]
        hashes.add(result.hashes or [])
        return
    kept: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    offset = {"train": 0, "val": 0}
    for split, n, source, nbytes, digest in result.per_doc:  # in input order
        if split == END:  # an input has no more documents
            budget.input_ended(source)
            continue
        if hashes.dedup and digest in hashes:
            hashes.duplicates += 1
        elif source < 0 or budget.admit(source, n):
            kept[split].append(result.tokens[split][offset[split] : offset[split] + n])
            counts[split]["documents"] += 1
            counts[split]["text_bytes"] += nbytes
            hashes.add([digest])
        offset[split] += n
    for split, pieces in kept.items():
        assert offset[split] == len(result.tokens[split])
        if pieces:
            writers[split].write(np.concatenate(pieces))


class DocHashes:
    """Content hashes of the documents in a data directory (DATA_DIR/doc_hashes.rN.npy,
    sorted uint64), for `--append` to skip documents it already holds."""

    def __init__(
        self, existing: np.ndarray | None = None, dedup: bool = False, part: Path | None = None
    ):
        """`part`: a file the new hashes are appended to as they come, so that a resumed
        prepare has those of the documents written before it stopped."""
        self.dedup, self.duplicates = dedup, 0
        self.known: set[int] = set(existing.tolist()) if existing is not None else set()
        self.new: list[int] = []
        self.part = open(part, "ab") if part is not None else None  # noqa: SIM115

    def __contains__(self, digest: int) -> bool:
        return digest in self.known

    def add(self, digests: list[int]) -> None:
        self.new += digests
        if self.dedup:
            self.known.update(digests)
        if self.part is not None and digests:
            self.part.write(np.asarray(digests, dtype="<u8").tobytes())

    def sync(self) -> int:
        """Make the part file durable; the number of new hashes in it."""
        if self.part is not None:
            self.part.flush()
            os.fsync(self.part.fileno())
        return len(self.new)

    def restore(self, count: int) -> None:
        """Take the first `count` hashes of the part file (a resumed prepare)."""
        assert self.part is not None
        path = Path(self.part.name)
        self.part.close()
        with open(path, "r+b") as f:
            f.truncate(count * 8)
        self.new = np.fromfile(path, dtype="<u8").tolist()
        if self.dedup:
            self.known.update(self.new)
        self.part = open(path, "ab")  # noqa: SIM115

    def save(self, folder: Path, name: str) -> None:
        if self.part is not None:
            self.part.close()
            self.part = None
        everything = np.fromiter(self.known | set(self.new), dtype=np.uint64)
        path = folder / name
        with open(path.with_suffix(".tmp"), "wb") as f:
            np.save(f, np.sort(everything), allow_pickle=False)
        os.replace(path.with_suffix(".tmp"), path)


def _update(
    bar, task, counts: dict, writers: dict[str, ShardWriter], started: float, by_tokens: bool
) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    mb = sum(c["text_bytes"] for c in counts.values()) / 1e6
    docs = sum(c["documents"] for c in counts.values())
    tokens = writers["train"].num_tokens + writers["val"].num_tokens
    bar.update(
        task,
        completed=tokens if by_tokens else mb,
        docs=docs,
        tokens=tokens,
        mb=mb,
        mb_per_s=mb / elapsed,
        tokens_per_s=tokens / elapsed,
    )


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """Human-readable closing summary of a prepared data directory."""
    lines = []
    tok = manifest["tokenizer"]
    lines.append(
        f"tokenizer: {tok['kind']} ({tok['spec']}), vocab {tok['vocab_size']:,}, ids stored as {manifest['dtype']}"
    )
    for row in manifest["source"].get("mixture", []):
        weight = f", weight {row['weight']:.1%}" if "weight" in row else ""
        lines.append(
            f"input {row['input']}: {row['tokens']:,} tokens, {row['share']:.2%} of the total{weight}"
        )
    for split, info in manifest["splits"].items():
        bpt = info["text_bytes"] / max(1, info["tokens"] - info["documents"])
        sizes = (
            ", ".join(f"{e['file']} {e['bytes'] / 1e6:.2f} MB" for e in info["shards"])
            or "no shards"
        )
        lines.append(
            f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
            f"{info['text_bytes'] / 1e6:.2f} MB text, {bpt:.2f} bytes/token; {sizes}"
        )
    return lines


def inspect(data_dir: str | Path, sample_tokens: int = 200) -> str:
    """Manifest summary plus a decoded sample from the start of the train split."""
    manifest = load_manifest(data_dir)
    lines = [f"{data_dir} ({manifest['created_by']}, format v{manifest['version']})"]
    lines += ["  " + line for line in summary_lines(manifest)]
    source = manifest["source"]
    lines.append(
        f"  source: {', '.join(source['inputs'])} (documents: {source['doc_unit']}, seed {source['seed']})"
    )
    split = open_split(data_dir, "train")
    if split.num_tokens and sample_tokens > 0:
        tok = load_tokenizer(Path(data_dir) / manifest["tokenizer"]["file"])
        ids = split.shards[0][:sample_tokens].tolist()
        lines.append(f"  first {len(ids)} train tokens, decoded:")
        lines.append(tok.decode(ids))
    return "\n".join(lines)
