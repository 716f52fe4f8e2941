"""A few short generations from a run's newest checkpoint, for a report.

Loading and generating are `lmlab generate`'s own (`build_from_checkpoint`,
`generate_text`). Without prompts, the prompt is the start of the first document of the
run's val data, when that data is still where the run read it and was tokenized with the
run's tokenizer; else the empty prompt, which starts a new document. Sample i is drawn
with seed i, so a report made twice shows the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import Config
from lmlab.data.shards import load_manifest, open_split
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import UserError
from lmlab.generate.text import generate_text
from lmlab.runs.checkpoint import read_meta
from lmlab.runs.load import build_from_checkpoint

MAX_NEW_TOKENS = 64
SAMPLES_PER_PROMPT = 2
TEMPERATURE = 0.8
PROMPT_TOKENS = 16
"""Length of a prompt taken from the val data."""


@dataclass
class Sample:
    prompt: str
    text: str
    """The continuation alone (without the prompt)."""
    seed: int


@dataclass
class RunSamples:
    checkpoint: Path
    step: int
    samples: list[Sample]


def default_prompt(cfg: Config, tokenizer: TextTokenizer) -> str:
    """The first PROMPT_TOKENS tokens of the first document in the run's val split, or ""
    when the data is gone, has no val split or was tokenized otherwise."""
    if not cfg.data.path:
        return ""
    try:
        manifest = load_manifest(cfg.data.path)
        if manifest["tokenizer"].get("sha256") != tokenizer.sha256():
            return ""
        split = open_split(cfg.data.path, "val")
    except (UserError, OSError):
        return ""
    ids = next((shard[: PROMPT_TOKENS * 4] for shard in split.shards if len(shard)), [])
    ids = [int(i) for i in ids]
    while ids and ids[0] == tokenizer.eot_id:  # documents start after an end-of-text
        ids = ids[1:]
    if tokenizer.eot_id in ids:
        ids = ids[: ids.index(tokenizer.eot_id)]
    # a byte-level token cut off inside a multi-byte character decodes to U+FFFD
    return tokenizer.decode(ids[:PROMPT_TOKENS]).rstrip("\ufffd")


def generate_samples(
    run_dir: str | Path,
    prompts: list[str] | None = None,
    *,
    samples_per_prompt: int = SAMPLES_PER_PROMPT,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    device: str | torch.device = "cpu",
) -> RunSamples:
    """`samples_per_prompt` continuations of each prompt (default: `default_prompt`) from
    the run's newest checkpoint. A UserError when the checkpoint cannot be loaded or a
    prompt has characters outside the model's vocabulary."""
    model, tokenizer, cfg, ckpt = build_from_checkpoint(run_dir, device)
    prompts = list(prompts) if prompts else [default_prompt(cfg, tokenizer)]
    for prompt in prompts:
        unknown = tokenizer.unknown_characters(prompt)
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:10])
            raise UserError(f"the prompt {prompt!r} has characters outside its vocabulary: {shown}")
    samples = []
    with torch.inference_mode():
        for prompt in prompts:
            # a short context (the smallest presets) holds fewer new tokens than asked for:
            # as many as fit after the prompt (the last one chosen is never fed back)
            prompt_tokens = len(tokenizer.encode(prompt)) if prompt else 1
            fits = max(1, cfg.model.context_length - prompt_tokens + 1)
            for seed in range(samples_per_prompt):
                pieces = generate_text(
                    model,
                    tokenizer,
                    prompt,
                    max_new_tokens=min(max_new_tokens, fits),
                    temperature=temperature,
                    seed=seed,
                )
                samples.append(Sample(prompt, "".join(pieces), seed))
    return RunSamples(ckpt, read_meta(ckpt)["step"], samples)
