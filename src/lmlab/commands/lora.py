"""`lmlab lora export|merge`: a LoRA fine-tune as a PEFT adapter, or as a full model."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  lmlab lora export runs/finetune-lora/20261124-101500 --out adapters/faq
  lmlab lora merge runs/finetune-lora/20261124-101500 --out models/faq-merged
  lmlab generate models/faq-merged --prompt "Q: how do I reset it?" --temperature 0

export writes adapter_config.json + adapter_model.safetensors that
peft.PeftModel.from_pretrained(<the base as a transformers model>, DIR) loads; merge writes
an lmlab checkpoint folder (W + scaling * B @ A) that eval, generate and finetune take."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab lora",
        description="Export a LoRA fine-tune as a PEFT adapter, or merge it into a full model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{export,merge}")
    for name, text in (
        ("export", "write a PEFT adapter folder"),
        ("merge", "write a full model with the adapters folded in"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=f"example: lmlab lora {name} runs/finetune-lora/20261124-101500 --out out/{name}",
        )
        p.add_argument("run", metavar="RUN_DIR|CKPT", help="a LoRA fine-tuning run or checkpoint")
        p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder to write")
        p.add_argument(
            "--overwrite", action="store_true", help="replace DIR (once the new one is complete)"
        )
    args = parser.parse_args(argv)
    if args.action == "merge":
        from lmlab.finetune.merge import merge_run

        out = merge_run(args.run, args.out, overwrite=args.overwrite)
        print(f"merged model written to {out} (an lmlab checkpoint folder)")
        return 0
    from lmlab.export.peft import export_run

    out = export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"PEFT adapter written to {out}")
    return 0
