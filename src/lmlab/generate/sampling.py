"""Autoregressive sampling, one token at a time, with or without a KV cache.

`generate` yields token ids as they are chosen, so a caller can stream them. The filters
(`top_k_filter`, `top_p_filter`) are pure functions on a logits vector.

Context length: a model sees at most `context_length` positions.
- With the cache (default), positions cannot slide out of it, so `generate` refuses up
  front (UserError) when prompt length + max_new_tokens - 1 > context_length (the last
  token chosen is never fed back, hence the -1).
- Without the cache, every step recomputes the whole sequence, cropped to its last
  context_length tokens: generation can run past the context, attending to a sliding
  window. The prompt may be longer than the context too (only its tail is read).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.generate.inference import inference_weights
from lmlab.generate.kv_cache import KVCache


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest (last dimension) set to -inf.

    Ties with the k-th value are kept, so slightly more than k may survive.
    """
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the most likely tokens whose total
    probability first reaches p, set the rest to -inf. The most likely token always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Probability mass strictly before each token: drop the token if that already covers p.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick a token id from a logits vector (vocab_size,); temperature 0 means argmax."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_token_ids: Iterable[int] = (),
) -> Iterator[int]:
    """Yield up to max_new_tokens token ids that continue the prompt idx (1, T).

    temperature 0 is greedy decoding; top_k and top_p (nucleus) restrict sampling to the
    most likely tokens. A seed makes sampling repeatable (a private torch.Generator; the
    global RNG is untouched). A token in stop_token_ids is yielded, then generation ends.
    The model is put in eval mode while generating and restored afterwards.
    Arguments are checked here, before the first token, and raise UserError.
    """
    if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
        raise UserError(f"prompt must be a (1, T) tensor with T >= 1, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (0 <= temperature < float("inf")):  # NaN fails this too
        raise UserError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    context_length = model.config.context_length
    prompt_len = idx.size(1)
    if use_cache and max_new_tokens > 0 and prompt_len + max_new_tokens - 1 > context_length:
        raise UserError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) does not fit the "
            f"model's context of {context_length} tokens; shorten them, or disable the KV cache "
            "to slide a window over the context"
        )
    return _generate(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        use_cache,
        frozenset(stop_token_ids),
    )


@torch.inference_mode()  # as a decorator it is entered and left around every step, not held
def _generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    use_cache: bool,
    stop_token_ids: frozenset[int],
) -> Iterator[int]:
    cfg = model.config
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    was_training = model.training
    model.eval()  # dropout off
    try:
        with inference_weights(model, several_rows=False):
            kv_cache = None
            if use_cache:
                param = next(model.parameters())
                kv_cache = KVCache.for_config(
                    cfg,
                    max_len=min(cfg.context_length, idx.size(1) + max_new_tokens),
                    dtype=param.dtype,
                    device=param.device,
                )
            # What the model reads next: with the cache, only tokens it has not seen (the prompt,
            # then one token per step); without it, the whole sequence, cropped to the context.
            next_input = idx if kv_cache is not None else idx[:, -cfg.context_length :]
            for _ in range(max_new_tokens):
                logits, _ = model(next_input, kv_cache=kv_cache)  # (1, T, vocab_size)
                token = sample_next_token(logits[0, -1], temperature, top_k, top_p, generator)
                yield token
                if token in stop_token_ids:
                    return
                new = torch.tensor([[token]], dtype=idx.dtype, device=idx.device)  # (1, 1)
                if kv_cache is not None:
                    next_input = new
                else:
                    next_input = torch.cat((next_input, new), dim=1)[:, -cfg.context_length :]
    finally:
        model.train(was_training)
