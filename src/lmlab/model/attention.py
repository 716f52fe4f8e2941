"""Causal scaled dot-product attention, shared by every model family.

Works with and without a KV cache; the caller passes key/value heads already expanded to
the number of query heads. Batched generation of prompts of different lengths passes its
own mask (left padding: each row's pad keys hidden), which replaces the causal triangle;
so does training on rows of packed documents (`document_attention`: each document reads
only itself, and its positions start at 0).
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


def document_attention(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) and attn_mask (B, 1, T, T) for rows that hold several documents.

    doc_ids (B, T) labels each token with its document; a document is a run of equal
    consecutive ids (padding is one more). A token reads the earlier tokens of its own
    document only, and positions restart at 0 at each document's first token, so a
    document in a packed row is computed as it would be alone. Built where doc_ids are
    (on the device): a few elementwise ops, no host loop.
    """
    B, T = doc_ids.shape
    index = torch.arange(T, device=doc_ids.device)  # (T,)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T): a document begins here
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): its document's start
    segment = starts.cumsum(dim=1)  # (B, T): runs numbered, even if an id were reused
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    return index - first, (same & causal)[:, None]
