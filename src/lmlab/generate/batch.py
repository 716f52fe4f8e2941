"""Generation for many prompts at once: left-padded batches sharing one KV cache.

Prompts of different lengths are padded on the left, so every row's last prompt token
sits in the same column and the next token of every row is read from the same place:

    row 0:  pad pad  a   b   c  | x1 x2 ...
    row 1:   d   e   f   g   h  | y1 y2 ...

Padding must change nothing, so two things follow each row, not the batch:
- positions: row 0's `a` is position 0 (GPT-2's position table, LLaMA's RoPE angles), not 2;
- the attention mask: no query reads a pad key. A pad query reads only itself, so that
  its (unused) output stays finite and cannot leak NaN into the cache.

A row ends at a stop token (not included in its output) or when `should_stop` says so;
ended rows are dropped from the batch and the cache, and the batch ends when every row
has. With temperature 0 a row's tokens are the tokens `lmlab.generate.sampling.generate`
gives for its prompt alone (tested): the only difference is in which matmul shapes
compute the same sums.

Weights are laid out for decoding meanwhile (lmlab.generate.inference).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.generate.inference import inference_weights
from lmlab.generate.kv_cache import KVCache
from lmlab.generate.sampling import top_k_filter, top_p_filter


def choose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row of logits (B, vocab_size) -> (B,); temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] = (),
    should_stop: Callable[[int, list[int]], bool] | None = None,
    pad_id: int = 0,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt, in input order; see the module docstring.

    `should_stop(prompt_index, new_ids)` is asked after each token a row gains (stop
    strings live there: the caller decodes and trims); True ends the row, its ids kept.
    `batch_size` prompts run together (None: all); prompts are grouped by length to keep
    padding short. `on_batch(prompts_done)` follows each batch (a progress bar). A seed
    makes sampling repeatable for the same prompts and batch size.
    """
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (0 <= temperature < float("inf")):  # NaN fails this too
        raise UserError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    context = model.config.context_length
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"prompt {i + 1} is empty: a prompt needs at least one token")
        if len(prompt) + max_new_tokens - 1 > context:
            raise UserError(
                f"prompt {i + 1} ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"does not fit the model's context of {context} tokens"
            )
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return results

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = batch_size or len(prompts)
    param = next(model.parameters())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(seed)
    stops = frozenset(stop_token_ids)
    several_rows = min(size, len(prompts)) > 1
    was_training = model.training
    model.eval()  # dropout off
    try:
        with inference_weights(model, several_rows), torch.inference_mode():
            for start in range(0, len(order), size):
                rows = order[start : start + size]
                outputs = _generate_rows(
                    model,
                    [prompts[i] for i in rows],
                    rows,
                    max_new_tokens,
                    (temperature, top_k, top_p, generator),
                    stops,
                    should_stop,
                    pad_id,
                )
                for i, output in zip(rows, outputs, strict=True):
                    results[i] = output
                if on_batch is not None:
                    on_batch(start + len(rows))
    finally:
        model.train(was_training)
    return results


def _generate_rows(
    model: nn.Module,
    prompts: list[list[int]],
    indices: list[int],
    max_new_tokens: int,
    sampling: tuple[float, int | None, float | None, torch.Generator | None],
    stops: frozenset[int],
    should_stop: Callable[[int, list[int]], bool] | None,
    pad_id: int,
) -> list[list[int]]:
    """One left-padded batch: prefill every prompt in one pass, then a token per step."""
    param = next(model.parameters())
    device = param.device
    B, L = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    pad = L - lengths  # (B,) pad columns at the start of each row
    idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        idx[b, L - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)

    max_len = L + max_new_tokens - 1  # the last token chosen is never fed back
    cache = KVCache.for_config(model.config, B, max_len, dtype=param.dtype, device=device)
    # Rows of equal length need no mask: the plain causal path (and its fast kernels).
    padded = bool(pad.any())
    key_valid = torch.arange(max_len, device=device)[None, :] >= pad[:, None]  # (B, max_len)
    positions = (torch.arange(L, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, L)
    mask = None
    if padded:
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # (L, L)
        itself = torch.eye(L, dtype=torch.bool, device=device)  # a pad query reads itself
        mask = (causal & (key_valid[:, None, :L] | itself))[:, None]  # (B, 1, L, L)
    logits, _ = model(idx, kv_cache=cache, positions=positions, attn_mask=mask)
    next_logits = logits[:, -1]  # (B, vocab_size)
    next_positions = lengths[:, None].clone()  # (B, 1)

    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(B))  # rows of this batch still generating, in cache order
    for step in range(max_new_tokens):
        tokens = choose_tokens(next_logits, *sampling)  # (A,)
        keep = []
        for a, (row, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            if token in stops:
                continue
            outputs[row].append(token)
            if should_stop is not None and should_stop(indices[row], outputs[row]):
                continue
            keep.append(a)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):  # drop ended rows from the batch and the cache
            kept = torch.tensor(keep, device=device)
            cache.keep_rows(kept)
            key_valid, next_positions, tokens = key_valid[kept], next_positions[kept], tokens[kept]
            active = [active[a] for a in keep]
        seen = cache.seq_len + 1
        mask = key_valid[:, None, None, :seen] if padded else None  # (A, 1, 1, seen)
        logits, _ = model(tokens[:, None], kv_cache=cache, positions=next_positions, attn_mask=mask)
        next_logits = logits[:, -1]
        next_positions += 1
    return outputs
