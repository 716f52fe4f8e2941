"""A run as a Hugging Face model folder that `transformers` loads unchanged.

    model.safetensors, config.json     GPT2LMHeadModel / LlamaForCausalLM /
                                       MixtralForCausalLM (model/hf.py's converter), with
                                       bos / eos / pad token ids
    generation_config.json             stops at the end-of-document token
    tokenizer.json, tokenizer_config.json
                                       eos / pad / bos tokens, model_max_length and the
                                       run's chat template, for AutoTokenizer

The export checks itself before the folder appears: it reloads the written files with
`transformers`, compares the logits with lmlab's on a fixed input and refuses (writing
nothing) when an fp32 export differs by more than 1e-4. A LoRA run is exported merged, when
asked to (`merge_lora=True`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import torch

from lmlab.errors import UserError
from lmlab.fileio import atomic_directory

ExportDType = Literal["fp32", "bf16", "fp16"]
EXPORT_DTYPES: tuple[str, ...] = get_args(ExportDType)
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_FP32_DIFFERENCE = 1e-4


def export_hf(
    spec: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    merge_lora: bool = False,
) -> dict[str, Any]:
    """Write a run's newest checkpoint (or a checkpoint) as a Hugging Face folder; returns
    where it wrote and the largest logit difference measured on reloading it.

    A LoRA run needs `merge_lora=True`: the folder then holds base + adapters folded into
    plain weights (for the adapters alone, as PEFT reads them, see export/peft.py)."""
    try:
        import transformers
    except ImportError:
        raise UserError(
            "exporting to Hugging Face needs transformers: pip install 'lmlab[hf]'"
        ) from None
    from lmlab.model.hf import quiet_transformers, to_hf
    from lmlab.model.lora import lora_modules
    from lmlab.model.lora import merge_lora as merge_lora_into
    from lmlab.runs.load import build_from_checkpoint

    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: --out must name a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty: choose another --out, or pass --overwrite")
    model, tokenizer, cfg, ckpt = build_from_checkpoint(spec, quantized=False)
    if lora_modules(model):
        if not merge_lora:
            raise UserError(
                f"{ckpt} is a {cfg.finetune.method} fine-tune (adapters on a base model): pass "
                "--merge-lora to fold them into the weights, or use `lmlab lora export` for a "
                "PEFT adapter"
            )
        model = merge_lora_into(model).eval()  # a plain model: base + adapters folded in
    hf_model = to_hf(model)
    eot, pad = (
        tokenizer.eot_id,
        tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id,
    )
    for settings in (hf_model.config, hf_model.generation_config):
        settings.bos_token_id, settings.eos_token_id, settings.pad_token_id = eot, eot, pad
    token = tokenizer.tokenizer.id_to_token
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.tokenizer,
        bos_token=token(eot),
        eos_token=token(eot),
        pad_token=token(pad),
        model_max_length=cfg.model.context_length,
    )
    template = ckpt / "chat_template.jinja"
    if template.is_file():
        fast.chat_template = template.read_text(encoding="utf-8")
    ids = torch.randint(
        0,
        cfg.model.vocab_size,
        (2, min(16, cfg.model.context_length)),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        expected = model(ids)[0].float()
    with atomic_directory(out, overwrite=out.exists()) as tmp, quiet_transformers():
        hf_model.to(_TORCH_DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp), dtype=torch.float32
        ).eval()
        with torch.no_grad():
            difference = (reloaded(input_ids=ids).logits.float() - expected).abs().max().item()
        if dtype == "fp32" and difference > MAX_FP32_DIFFERENCE:
            raise UserError(
                f"the exported model's logits differ from lmlab's by {difference:.2e} "
                f"(over {MAX_FP32_DIFFERENCE:g}); nothing was written. This is a bug: please report it"
            )
    return {
        "out": str(out),
        "checkpoint": str(ckpt),
        "dtype": dtype,
        "max_logit_difference": difference,
    }
