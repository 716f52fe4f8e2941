"""`lmlab export`: a run as a Hugging Face model folder that transformers loads unchanged."""

from __future__ import annotations

import argparse
import json

EPILOG = """examples:
  lmlab export runs/tiny/20261123-101500 --out exported/tiny
  lmlab export runs/finetune-lora/20261124-101500 --out exported/faq --dtype bf16
  python -c "from transformers import pipeline; print(pipeline('text-generation', 'exported/tiny')('Hello')[0])"

The folder holds model.safetensors, config.json (with bos/eos/pad ids),
generation_config.json, tokenizer.json and tokenizer_config.json (eos, pad, model_max_length,
the run's chat template). A LoRA run is exported with its adapters merged; for a PEFT
adapter instead, use `lmlab lora export`. Before the folder appears, the export reloads it
in transformers and compares logits with lmlab's (an fp32 export over 1e-4 is refused)."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab export",
        description="Export a run or checkpoint as a Hugging Face folder (GPT2LMHeadModel / LlamaForCausalLM).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("run", metavar="RUN_DIR|CKPT")
    parser.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="folder to write (new or empty)"
    )
    parser.add_argument(
        "--format", default="hf", choices=("hf",), help="hf (Hugging Face; default)"
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights (fp32)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR (once the new one is complete)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    from lmlab.export.hf import export_hf

    result = export_hf(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"exported {result['checkpoint']} to {result['out']} ({result['dtype']}); reloaded in "
            f"transformers, max logit difference {result['max_logit_difference']:.2e}"
        )
    return 0
