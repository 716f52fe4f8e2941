"""`lmlab finetune`: adapt a trained model to your data (full, LoRA, DPO), as a resumable run."""

from __future__ import annotations

import argparse
import os
import sys

from lmlab.config import build_config, load_config, merge, parse_override
from lmlab.recipes import is_finetune_recipe
from lmlab.runs.menu import interactive, resume_or_new

EPILOG = """examples:
  lmlab finetune --from runs/tiny/20261123-101500 --data faq.jsonl --method lora
  lmlab finetune --from ./my-hf-llama --data chats.jsonl --method full train.lr=2e-5
  lmlab finetune --from runs/tiny/20261123-101500 --data dsl:flowroll:2000 --method lora finetune.lora_rank=16
  lmlab finetune --from runs/sft/20261124-090000 --data prefs.jsonl --method dpo-lora
  lmlab finetune --from ./my-hf-llama --adapter ./peft-adapter --data more.jsonl --method lora
  lmlab finetune --resume runs/finetune-lora/20261124-101500

data (JSONL, one record per line; the format is read from the keys):
  {"prompt": "...", "completion": "..."}           loss on the completion only
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
                                                   the model's chat template (or lmlab's
                                                   default, saved with the run); loss on
                                                   assistant turns only
  {"text": "..."}                                  continued pretraining, loss on every token
  {"prompt": "...", "chosen": "...", "rejected": "..."}   preference pairs, for dpo
  dsl:flowroll[:N[:DIFFICULTY]] / dsl:dimmatch     practice-language programs -> results

methods: full (every weight), lora (adapters on a frozen base; `lmlab lora export` makes a
PEFT adapter, `lmlab lora merge` a full model), dpo / dpo-lora (preference pairs, the
starting model as reference). Defaults per method: `lmlab config show --preset finetune-lora`.
A fine-tune is an ordinary run: `lmlab runs`, `eval`, `generate` and `--resume` work on it,
and in a terminal lmlab offers to resume an unfinished fine-tune of the same name (--new: never).
Docs: docs/finetuning.md."""

METHODS = {  # --method -> (recipe, finetune.method, finetune.objective)
    "full": ("finetune-full", "full", "sft"),
    "lora": ("finetune-lora", "lora", "sft"),
    "qlora": ("finetune-lora", "qlora", "sft"),
    "dpo": ("finetune-dpo", "full", "dpo"),
    "dpo-lora": ("finetune-dpo-lora", "lora", "dpo"),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmlab finetune",
        description="Fine-tune an lmlab run or a Hugging Face model on prompt/completion, chat, "
        "text or preference data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides"
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        help="base model: lmlab run or checkpoint folder, Hugging Face folder, or Hub name",
    )
    parser.add_argument("--data", "-d", metavar="DATA", help="JSONL file, or dsl:flowroll[:N]")
    parser.add_argument(
        "--val-data", metavar="FILE", help="validation JSONL (default: a split of --data)"
    )
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="start LoRA from a PEFT adapter folder (made for this base)",
    )
    parser.add_argument(
        "--method", "-m", choices=list(METHODS), default="lora", help="(default lora)"
    )
    parser.add_argument(
        "--preset", "-p", default=None, help="a finetune-* recipe (default: the method's own)"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    parser.add_argument(
        "--on-overflow",
        choices=("truncate", "error"),
        default=None,
        help="examples longer than the sequence: truncate (default, counted) or stop",
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a fine-tuning run")
    parser.add_argument(
        "--new",
        action="store_true",
        help="start a new run without offering to resume one of the same name",
    )
    parser.add_argument(
        "--stop-at-step", type=int, metavar="N", help="stop (with a checkpoint) after step N"
    )
    args = parser.parse_args(argv)
    if args.stop_at_step is not None and args.stop_at_step < 1:
        parser.error(f"--stop-at-step must be a step >= 1, got {args.stop_at_step}")

    overrides = list(args.overrides)
    for flag, key in (
        ("source", "finetune.base"),
        ("data", "finetune.data"),
        ("val_data", "finetune.val_data"),
        ("adapter", "finetune.adapter"),
        ("on_overflow", "finetune.on_overflow"),
        ("device", "train.device"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.skip_bad:
        overrides.append("finetune.skip_bad=true")

    from lmlab.finetune.task import finetune  # torch is imported only when training

    live = sys.stdout.isatty()
    resume = args.resume
    if resume and args.preset:
        parser.error("--resume continues a run with its saved config; --preset cannot change it")
    if not resume:
        if not args.source or not args.data:
            parser.error("--from SOURCE and --data DATA are required (or --resume RUN_DIR)")
        recipe, method, objective = METHODS[args.method]
        preset = args.preset or recipe
        if not is_finetune_recipe(preset):
            parser.error(
                f"--preset {preset} is not a fine-tuning recipe (finetune-full, finetune-lora, ...)"
            )
        settings = [f"finetune.method={method}", f"finetune.objective={objective}"]
        if any(o.startswith("train.max_steps=") for o in overrides):  # steps, not epochs
            settings.append("finetune.epochs=0")
        cfg = build_config(preset, overrides=[*settings, *overrides])
        resume = resume_or_new(cfg) if not args.new and interactive() else None
        if resume == "quit":
            return 1
    if resume:  # the saved config, with this command line's overrides
        cfg = load_config(f"{resume}/config.yaml")
        if cfg.finetune.base == "":
            parser.error(f"{resume} is not a fine-tuning run: use `lmlab train --resume`")
        for text in overrides:
            cfg = merge(cfg, parse_override(text))
    result = finetune(cfg, resume=resume, stop_at_step=args.stop_at_step, log=_log, live=live)
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {result.run_dir}")
    return 130 if result.interrupted and args.stop_at_step is None else 0


def _log(message: str, end: str = "\n") -> None:
    print(message, end=end, flush=True)
