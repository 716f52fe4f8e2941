"""`lmlab publish`: a run or an exported folder on the Hugging Face Hub, with a model card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """examples:
  lmlab publish runs/finetune-lora/20261124-101500 --repo alice/flowroll-tiny --dry-run
  lmlab publish runs/finetune-lora/20261124-101500 --repo alice/flowroll-tiny --license mit \\
      --eval scores.json --eval mc.json
  lmlab publish exported/flowroll --repo alice/flowroll-tiny --private

RUN is exported first (`lmlab export`, LoRA runs merged); an exported folder is used as is.
The folder to upload (default ./publish/NAME) gets a README.md model card: metadata for the
Hub (license, base model, datasets, metrics), architecture, training configuration, a loss
curve (loss_curve.png, with matplotlib), evaluation results (the run's validation loss,
plus the reports of `lmlab score --out` / `lmlab eval --task --out` given with --eval),
usage, intended use and limits.

The token comes from HF_TOKEN or `hf auth login` only, and is never written
anywhere. --dry-run (and HF_HUB_OFFLINE=1) writes the folder and uploads nothing: what is
on disk is exactly what would be uploaded. The upload itself is not tested in CI (no
internet there); everything before it is."""


def main(argv: list[str]) -> int:
    """Run `lmlab publish ARGV...`; bad input raises UserError."""
    parser = argparse.ArgumentParser(
        prog="lmlab publish",
        description="Publish a run or an exported Hugging Face folder on the Hub, with a "
        "model card written from the run's own files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("source", metavar="RUN|CKPT|HF_DIR")
    parser.add_argument("--repo", required=True, metavar="OWNER/NAME", help="Hub repo id")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="write the folder, upload nothing")
    parser.add_argument("--out", default=None, metavar="DIR", help="folder (./publish/NAME)")
    parser.add_argument(
        "--license", default="other", help="license id for the card (e.g. mit, apache-2.0)"
    )
    parser.add_argument(
        "--eval", action="append", default=[], metavar="REPORT.json", help="repeatable"
    )
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    from lmlab.export.publish import publish

    result = publish(
        args.source,
        args.repo,
        out=args.out,
        private=args.private,
        dry_run=args.dry_run,
        license=args.license,
        evaluations=[Path(e) for e in args.eval],
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"wrote {result['out']}: {', '.join(result['files'])}")
    if result["uploaded"]:
        print(f"uploaded to {result['url']}")
    else:
        print(f"dry run: nothing uploaded (this folder is what `--repo {args.repo}` would get)")
    return 0
