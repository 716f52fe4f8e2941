"""`lmlab prepare`: documents -> tokenizer -> train/val token shards + manifest.

The main process reads documents in batches of about a megabyte and assigns each to train
or val by a hash of its text (so the split does not depend on input order, and duplicates
never straddle it). Worker processes, one per core, each run a single-threaded encoder and
turn its output into numpy arrays with an end-of-document token after every document; the
main process writes the arrays in input order. Processes rather than threads, because
turning encodings into Python id lists holds the GIL and costs ~15% of the encode itself.

Everything is written into a temporary folder that is renamed to DATA_DIR only when
complete: a failure leaves no partial output.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab import __version__
from lmlab.data.corpus import Corpus, Document
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
from lmlab.fileio import atomic_directory, atomic_write_json

BATCH_CHARS = 1 << 20
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
    chars: int = 0


def _batches(docs: Iterable[Document]) -> Iterator[_Batch]:
    batch = _Batch([], [])
    for doc in docs:
        batch.texts.append(doc.text)
        batch.splits.append(doc.split)
        batch.chars += len(doc.text)
        if batch.chars >= BATCH_CHARS:
            yield batch
            batch = _Batch([], [])
    if batch.texts:
        yield batch


@dataclass
class _Encoded:
    """A worker's result for one batch: tokens and counts per split, in document order."""

    tokens: dict[str, np.ndarray]
    documents: dict[str, int]
    text_bytes: dict[str, int]


_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    # One process per core already; the encoder's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker_tokenizer.encode_special_tokens = True  # as TextTokenizer does


def _encode_batch(
    batch: _Batch, eot_id: int, dtype: np.dtype, seed: int, val_fraction: float
) -> _Encoded:
    """Split, encode and flatten one batch (runs in a worker process)."""
    pieces: dict[str, list[str]] = {"train": [], "val": []}
    ends_doc: dict[str, list[bool]] = {"train": [], "val": []}
    documents = {"train": 0, "val": 0}
    text_bytes = {"train": 0, "val": 0}
    for text, given in zip(batch.texts, batch.splits, strict=True):
        data = text.encode("utf-8")
        split = given or split_of(data, seed, val_fraction)
        if split not in pieces:
            continue  # a practice language's test programs stay unseen
        documents[split] += 1
        text_bytes[split] += len(data)
        parts = _pieces(text)
        pieces[split] += parts
        ends_doc[split] += [False] * (len(parts) - 1) + [True]
    tokens, eot = {}, (eot_id,)
    for split in ("train", "val"):
        encodings = _worker_tokenizer.encode_batch_fast(pieces[split], add_special_tokens=False)
        chained = itertools.chain.from_iterable(
            itertools.chain(e.ids, eot) if end else e.ids
            for e, end in zip(encodings, ends_doc[split], strict=True)
        )
        tokens[split] = np.fromiter(chained, dtype=dtype)
    return _Encoded(tokens, documents, text_bytes)


def _progress(total_bytes: int | None, enabled: bool):
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
        TextColumn(
            "{task.completed:,.0f}/{task.fields[total_mb]} MB"
            if total_bytes
            else "{task.fields[mb]:.1f} MB"
        ),
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
    overwrite: bool = False,
    eot_token: str | None = None,
    progress: bool = False,
    log=print,
) -> dict[str, Any]:
    """Tokenize `inputs` into train/val shards under `out`; returns the manifest.

    `tokenizer` is a spec (`bpe:N`, `char`, `char:N` train one on the training documents;
    a `tokenizer.json`, a folder holding one, or a Hub name load one) or a TextTokenizer.
    """
    out = Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
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
    started = time.perf_counter()

    tokenizer_spec = tokenizer if isinstance(tokenizer, str) else "given"
    if isinstance(tokenizer, str):
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
            train_texts = (
                d.text
                for d in corpus.documents()
                if kind == "char" or (d.split or split_of(d.text, seed, val_fraction)) == "train"
            )
            tok = train_tokenizer(kind, train_texts, vocab_size)
    else:
        tok = tokenizer
    tokenizer_s = time.perf_counter() - started
    dtype = dtype_for_vocab(tok.vocab_size)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        tok.save(tmp)
        counts = {s: {"documents": 0, "text_bytes": 0} for s in ("train", "val")}
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        encode_started = time.perf_counter()
        total_bytes = corpus.total_file_bytes()
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
            with _progress(total_bytes, progress) as bar:
                task = bar.add_task(
                    "tokenize",
                    total=(total_bytes or 0) / 1e6 or None,
                    total_mb=f"{(total_bytes or 0) / 1e6:,.0f}",
                    mb=0.0,
                    mb_per_s=0.0,
                    tokens_per_s=0.0,
                )
                in_flight: collections.deque = collections.deque()
                args = (tok.eot_id, dtype, seed, val_fraction)
                for batch in _batches(corpus.documents()):
                    in_flight.append(pool.submit(_encode_batch, batch, *args))
                    # Keep every worker busy, but bound memory; write results in input order.
                    while len(in_flight) > 2 * workers:
                        _write_result(in_flight.popleft().result(), writers, counts)
                        _update(bar, task, counts, writers, encode_started)
                while in_flight:
                    _write_result(in_flight.popleft().result(), writers, counts)
                    _update(bar, task, counts, writers, encode_started)
        encode_s = time.perf_counter() - encode_started
        shards = {s: w.close() for s, w in writers.items()}

        if corpus.skipped.summary():
            log(f"warning: {corpus.skipped.summary()}")
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
            },
            "timing_s": {"tokenizer": round(tokenizer_s, 3), "encode": round(encode_s, 3)},
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def _write_result(result: _Encoded, writers: dict[str, ShardWriter], counts: dict) -> None:
    for split, tokens in result.tokens.items():
        writers[split].write(tokens)
        counts[split]["documents"] += result.documents[split]
        counts[split]["text_bytes"] += result.text_bytes[split]


def _update(bar, task, counts: dict, writers: dict[str, ShardWriter], started: float) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    mb = sum(c["text_bytes"] for c in counts.values()) / 1e6
    tokens = writers["train"].num_tokens + writers["val"].num_tokens
    bar.update(task, completed=mb, mb=mb, mb_per_s=mb / elapsed, tokens_per_s=tokens / elapsed)


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """Human-readable closing summary of a prepared data directory."""
    lines = []
    tok = manifest["tokenizer"]
    lines.append(
        f"tokenizer: {tok['kind']} ({tok['spec']}), vocab {tok['vocab_size']:,}, ids stored as {manifest['dtype']}"
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
