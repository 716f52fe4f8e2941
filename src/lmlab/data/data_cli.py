"""`lmlab data inspect|verify DATA_DIR`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmlab.data.prepare import summary_lines
from lmlab.data.shards import load_manifest, open_split, verify
from lmlab.data.tokenizer import load_tokenizer


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab data",
        description="Inspect or verify a data directory written by `lmlab prepare`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmlab data inspect data/flowroll\n  lmlab data verify data/flowroll",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{inspect,verify}")
    p = sub.add_parser(
        "inspect",
        help="manifest summary and a decoded sample",
        epilog="example: lmlab data inspect data/flowroll --tokens 100",
    )
    p.add_argument("data_dir")
    p.add_argument(
        "--tokens", type=int, default=200, help="how many train tokens to decode (default 200)"
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead")
    p = sub.add_parser(
        "verify",
        help="check every shard's size, header and SHA-256 against the manifest",
        epilog="example: lmlab data verify data/flowroll",
    )
    p.add_argument("data_dir")
    args = parser.parse_args(argv)
    if args.action == "inspect":
        if args.json:
            print(json.dumps(load_manifest(args.data_dir), indent=2))
        else:
            print(inspect(args.data_dir, args.tokens))
        return 0
    problems = verify(args.data_dir)
    manifest = load_manifest(args.data_dir)
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        print(f"{args.data_dir}: {len(problems)} problem(s) in {n} shards", file=sys.stderr)
        return 1
    print(f"{args.data_dir}: OK ({n} shards and the tokenizer match the manifest)")
    return 0
