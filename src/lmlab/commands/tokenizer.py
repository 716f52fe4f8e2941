"""`lmlab tokenizer train`: train a tokenizer on files, folders, globs or built-in corpora."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.data.corpus import Corpus
from lmlab.data.tokenizer import MAX_VOCAB_SIZE, check_vocab_size, train_tokenizer
from lmlab.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab tokenizer",
        description="Train a tokenizer and save it as tokenizer.json (loadable by transformers).",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{train}")
    p = sub.add_parser(
        "train",
        help="train a byte-level BPE or char-level tokenizer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  lmlab tokenizer train --input notes/ --kind bpe --vocab-size 8192 --out tok/notes
  lmlab tokenizer train --input shakespeare.txt --kind char --out tok/chars""",
    )
    p.add_argument(
        "--input",
        "-i",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, folders, globs, dsl:NAME or hf:NAME",
    )
    p.add_argument(
        "--kind",
        choices=("bpe", "char"),
        default="bpe",
        help="byte-level BPE (default) or char-level",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size incl. special tokens (bpe: required; char: a cap)",
    )
    p.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="folder to write tokenizer.json into"
    )
    p.add_argument(
        "--text-field",
        default="text",
        help="text field of JSONL records and datasets (default: text)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing tokenizer.json in DIR"
    )
    args = parser.parse_args(argv)
    if args.vocab_size is None:
        if args.kind == "bpe":
            raise UserError("bpe needs --vocab-size, e.g. --vocab-size 4096")
        args.vocab_size = MAX_VOCAB_SIZE
    check_vocab_size(args.kind, args.vocab_size)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a folder to write tokenizer.json into")
    if (out / "tokenizer.json").exists() and not args.overwrite:
        raise UserError(
            f"{out / 'tokenizer.json'} already exists: choose another --out or pass --overwrite"
        )
    corpus = Corpus(args.input, text_field=args.text_field)
    documents = 0

    def texts():
        nonlocal documents
        for doc in corpus.documents():
            documents += 1
            yield doc.text

    tok = train_tokenizer(args.kind, texts(), args.vocab_size)
    if corpus.skipped.summary():
        print(f"warning: {corpus.skipped.summary()}")
    if documents == 0:
        raise UserError(
            "no text found in the inputs"
            + (f" ({corpus.skipped.summary()})" if corpus.skipped.summary() else "")
        )
    path = tok.save(out)
    print(f"wrote {path}: {tok.kind}, vocab {tok.vocab_size:,} (end-of-document id {tok.eot_id})")
    return 0
