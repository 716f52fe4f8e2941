"""`lmlab prepare`: documents -> tokenizer -> train/val token shards + manifest (lmlab.data.prepare)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmlab.data.frames import COMPRESSIONS
from lmlab.data.prepare import DEFAULT_SHARD_TOKENS, prepare, summary_lines
from lmlab.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab prepare",
        description="Tokenize documents into train/val token shards with a manifest and checksums.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  lmlab prepare --input dsl:flowroll --tokenizer bpe:512 --out data/flowroll
  lmlab prepare --input notes/ 'more/**/*.md' --tokenizer bpe:8192 --out data/notes
  lmlab prepare --input sample:shakespeare --tokenizer char --out data/shakespeare-char  # shipped, offline
  lmlab prepare --input hf:roneneldan/TinyStories --tokenizer gpt2 --out data/tinystories
  lmlab prepare --input train.txt --val-input val.txt --tokenizer char --out data/split
  lmlab prepare --input corpus/ --tokenizer bpe:50257 bpe:32000 --out data/gpt2tok data/llamatok
  lmlab prepare --input shakespeare.txt --tokenizer char --doc-unit file --val-split tail --out data/nanogpt
  lmlab prepare --input hf:HuggingFaceFW/fineweb-edu --tokenizer gpt2 --max-tokens 100M --out data/edu
  lmlab prepare --input web.jsonl@0.7 books/@0.3 --max-tokens 50M --tokenizer bpe:8192 --out data/mix
  lmlab prepare --input corpus/ --tokenizer bpe:8192 --out data/notes --resume   # after a Ctrl-C
  lmlab prepare --input new-notes/ --out data/notes --append      # new shards, same tokenizer

inputs: files (.txt .md .jsonl), folders (recursive), globs, sample:shakespeare (shipped with
lmlab), dsl:flowroll, dsl:dimmatch (dsl:NAME:PROGRAMS:DIFFICULTY), hf:NAME or hf:LOCAL_PATH (Hugging Face datasets, streamed);
INPUT@WEIGHT on every input mixes them in those token shares (with --max-tokens: of that
total; without: until the first input runs out).
tokenizer: bpe:N or char[:N] trains one on the training documents; a tokenizer.json, a folder
holding one, or a Hub name loads one.""",
    )
    parser.add_argument(
        "--input", "-i", nargs="+", required=True, metavar="PATH", help="what to tokenize"
    )
    parser.add_argument(
        "--tokenizer",
        "-t",
        nargs="+",
        default=["bpe:4096"],
        metavar="SPEC",
        help="bpe:N, char[:N], a path or a Hub name (default: bpe:4096); several, with one "
        "--out each, prepare the same documents and split once per tokenizer",
    )
    parser.add_argument(
        "--out",
        "-o",
        nargs="+",
        required=True,
        metavar="DATA_DIR",
        help="output folder (must not exist unless --overwrite); one per --tokenizer",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of documents held out for validation (default 0.1)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the document split and of generated corpora (default 0)",
    )
    parser.add_argument(
        "--doc-unit",
        choices=("auto", "file", "paragraph"),
        default="auto",
        help="what a text file contributes: one document, or one per paragraph; auto = paragraphs when under 100 text files",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        help="field holding the text in JSONL records and datasets (default: text)",
    )
    parser.add_argument(
        "--hf-config", default=None, help="dataset configuration name for hf: inputs"
    )
    parser.add_argument(
        "--hf-split", default="train", help="dataset split for hf: inputs (default: train)"
    )
    parser.add_argument(
        "--val-input",
        nargs="+",
        default=None,
        metavar="PATH",
        help="the validation data, as --input takes it; then every --input document trains",
    )
    parser.add_argument(
        "--val-split",
        choices=("hash", "tail"),
        default="hash",
        help="hash: documents held out by a seeded hash (default); tail: the last "
        "--val-fraction of the text of the file inputs, nanoGPT-style",
    )
    parser.add_argument(
        "--hf-val-split",
        default="validation",
        help="dataset split for hf: --val-input inputs (default: validation)",
    )
    parser.add_argument(
        "--eot-token",
        default=None,
        help="end-of-document token of a loaded tokenizer, if not found automatically",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard file (default 100M)",
    )
    parser.add_argument(
        "--compress",
        choices=COMPRESSIONS,
        default=None,
        help="write shards as lz4 or zstd frames with an index (default: raw, memory-mapped); "
        "needs pip install 'lmlab[compress]'",
    )
    parser.add_argument(
        "--max-tokens",
        type=_count,
        default=None,
        metavar="N",
        help="stop at N tokens in all, end-of-document tokens included (1e6, 50M, 2B)",
    )
    parser.add_argument(
        "--max-input-tokens",
        type=_count,
        default=None,
        metavar="N",
        help="take at most N tokens from each input",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add the inputs' documents to the existing DATA_DIR as new shards (with its "
        "tokenizer); documents it already holds are skipped",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a prepare that was stopped (Ctrl-C, a kill): the same command, plus --resume",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DATA_DIR if it exists (only once the new one is complete)",
    )
    args = parser.parse_args(argv)
    if len(args.tokenizer) != len(args.out):
        raise UserError(
            f"{len(args.tokenizer)} --tokenizer but {len(args.out)} --out: give one output folder "
            "per tokenizer, in the same order"
        )
    for out in args.out:  # every output checked before any work
        if Path(out).exists() and not args.overwrite and not args.append:
            raise UserError(f"{out} already exists: choose another --out or pass --overwrite")
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    manifests = []
    for tokenizer, out in zip(args.tokenizer, args.out, strict=True):
        manifest = prepare(
            args.input,
            out,
            tokenizer,
            val_fraction=args.val_fraction,
            seed=args.seed,
            doc_unit=args.doc_unit,
            text_field=args.text_field,
            hf_config=args.hf_config,
            hf_split=args.hf_split,
            val_inputs=args.val_input,
            hf_val_split=args.hf_val_split,
            val_split=args.val_split,
            shard_tokens=args.shard_tokens,
            compress=args.compress,
            overwrite=args.overwrite,
            eot_token=args.eot_token,
            max_tokens=args.max_tokens,
            max_input_tokens=args.max_input_tokens,
            resume=args.resume,
            append=args.append,
            progress=sys.stderr.isatty(),
            log=log,
        )
        manifests.append(manifest)
        for line in summary_lines(manifest):
            print(line)
        if args.append:
            continue  # the append said what it added; the summary above is the whole directory
        t = manifest["timing_s"]
        mb = sum(s["text_bytes"] for s in manifest["splits"].values()) / 1e6
        print(
            f"wrote {out} in {t['tokenizer'] + t['encode']:.1f}s ({mb / max(t['encode'], 1e-9):.2f} MB/s tokenizing)"
        )
    if len(manifests) > 1:
        # Documents go to train or val by a hash of their text: the same split for each.
        print("same documents, same split; bytes per token (train):")
        for tokenizer, out, manifest in zip(args.tokenizer, args.out, manifests, strict=True):
            train = manifest["splits"]["train"]
            text_tokens = max(1, train["tokens"] - train["documents"])  # without end-of-doc
            print(f"  {tokenizer:<24} {train['text_bytes'] / text_tokens:.3f}  ({out})")
    return 0


def _count(text: str) -> int:
    from lmlab.data.mixture import parse_count

    try:
        return parse_count(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
