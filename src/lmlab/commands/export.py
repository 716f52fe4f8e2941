"""`lmlab export`: a run as a Hugging Face model folder, or as one GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import json
import os

from lmlab.errors import UserError

EPILOG = """examples:
  lmlab export runs/tiny/20261123-101500 --out exported/tiny
  lmlab export runs/finetune-lora/20261124-101500 --out exported/faq --merge-lora --dtype bf16
  lmlab export runs/tiny/20261123-101500 --format gguf --out exported/tiny-q8.gguf --dtype q8_0
  lmlab export runs/tiny/20261123-101500 --format gguf --out exported/   # exported/NAME-f32.gguf
  llama-cli -m exported/tiny-q8.gguf -p "[3 1 2] | sort =>" -n 16         # llama.cpp
  python -c "from transformers import pipeline; print(pipeline('text-generation', 'exported/tiny')('Hello')[0])"

--format hf (default) writes a folder: model.safetensors, config.json (with bos/eos/pad ids),
generation_config.json, tokenizer.json and tokenizer_config.json (eos, pad, model_max_length,
the run's chat template). --dtype fp32 | bf16 | fp16.

--format gguf writes one file for llama.cpp (arch "gpt2" or "llama", byte-level BPE tokenizer
with pre-tokenizer "gpt-2", the chat template if the run has one). --out is a FILE ending in
.gguf, or an existing folder to hold NAME-DTYPE.gguf (NAME: the run's name); an existing
file is replaced only with --overwrite. --dtype f32 | f16 | q8_0: norms, biases and GPT-2's
position table stay f32; q8_0 stores a weight f16 when its rows are not a multiple of 32
long (listed as f16_fallback in --json). A char-level tokenizer cannot be written to GGUF.

A LoRA run needs --merge-lora (its adapters folded into the weights); for a PEFT adapter
instead, use `lmlab lora export`. Before anything appears, the export reloads the result in
transformers and compares logits with lmlab's (an fp32 / f32 export over 1e-4 is refused);
a GGUF export also checks that the tokenizer read from the file gives lmlab's ids."""

FORMATS = ("hf", "gguf")
DTYPES = {"hf": ("fp32", "bf16", "fp16"), "gguf": ("f32", "f16", "q8_0")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab export",
        description="Export a run or checkpoint as a Hugging Face folder (GPT2LMHeadModel / "
        "LlamaForCausalLM) or as a GGUF file for llama.cpp.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("run", metavar="RUN_DIR|CKPT")
    parser.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="PATH",
        help="hf: folder to write (new or empty); gguf: FILE.gguf or an existing folder",
    )
    parser.add_argument(
        "--format", default="hf", choices=FORMATS, help="hf (Hugging Face; default) or gguf"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        metavar="DTYPE",
        help="weights: hf fp32 (default) | bf16 | fp16; gguf f32 (default) | f16 | q8_0",
    )
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold a LoRA run's adapters into the weights (required for a LoRA run)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the output (once the new one is complete)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    # transformers' GGUF reader draws a plain tqdm bar, which reads this when tqdm is first
    # imported (the export prints its own one-line result).
    os.environ.setdefault("TQDM_DISABLE", "1")
    dtype = args.dtype or DTYPES[args.format][0]
    if dtype not in DTYPES[args.format]:
        raise UserError(
            f"--dtype for --format {args.format} must be one of "
            f"{', '.join(DTYPES[args.format])}, got {dtype!r}"
        )
    if args.format == "gguf":
        from lmlab.export.gguf import export_gguf

        result = export_gguf(
            args.run, args.out, dtype=dtype, overwrite=args.overwrite, merge_lora=args.merge_lora
        )
    else:
        from lmlab.export.hf import export_hf

        result = export_hf(
            args.run, args.out, dtype=dtype, overwrite=args.overwrite, merge_lora=args.merge_lora
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"exported {result['checkpoint']} to {result['out']} ({result['dtype']}); reloaded in "
        f"transformers, max logit difference {result['max_logit_difference']:.2e}"
    )
    expected = result.get("expected_max_difference")
    if expected is not None and result["max_logit_difference"] > expected:
        print(
            f"note: that is more than the {expected:g} usually seen for {result['dtype']}; "
            "check the model's outputs before relying on this file"
        )
    if result.get("f16_fallback"):
        print(
            f"{len(result['f16_fallback'])} weights stored f16 (rows not a multiple of 32 long): "
            + ", ".join(result["f16_fallback"])
        )
    return 0
