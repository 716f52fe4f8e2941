"""`lmlab data inspect|verify DATA_DIR`."""

from __future__ import annotations

import argparse
import json
import sys

from lmlab.data.prepare import inspect
from lmlab.data.shards import load_manifest, verify
from lmlab.errors import UserError


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
            if args.tokens < 0:
                raise UserError(f"--tokens must be >= 0, got {args.tokens}")
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
