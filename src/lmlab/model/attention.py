"""Causal scaled dot-product attention, shared by every model family.

Works with and without a KV cache; the caller passes key/value heads already expanded to
the number of query heads. Batched generation of prompts of different lengths passes its
own mask (left padding: each row's pad keys hidden), which replaces the causal triangle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention where query i sees keys up to its own position.

    q is (B, n_head, T, head_dim); k and v are (B, n_head, S, head_dim) with S >= T, the
    first S - T keys coming from a KV cache. The queries are the last T positions.
    attn_mask, if given, is (B, 1, T, S) bool, True where a query may read a key; it must
    already be causal (it is used as is).
    """
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    T, S = q.size(2), k.size(2)
    if S == T:  # no cache, or an empty one: the usual triangle
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # Several new tokens after a cache: is_causal would align the triangle to the top-left
    # (query 0 sees key 0 only), so spell the mask out: query i sees keys 0 .. S - T + i.
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
