"""Text in, text out: prompts through the tokenizer, tokens streamed back as text."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lmlab.data.tokenizer import TextTokenizer
from lmlab.generate.sampling import generate


def generate_text(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_end_of_document: bool = True,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece, as it is generated.

    An empty prompt starts a new document. Pieces are whole characters: a byte-level
    token that ends inside a multi-byte character is held back until the character is
    complete.
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    stop = (tokenizer.eot_id,) if stop_at_end_of_document else ()
    new: list[int] = []
    emitted = ""
    for token in generate(
        model, idx, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids=stop
    ):
        if token in stop:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence; wait for the next token
        yield text[len(emitted) :]
        emitted = text
    text = tokenizer.decode(new)
    if len(text) > len(emitted):
        yield text[len(emitted) :]
