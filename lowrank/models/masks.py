"""Attention masks of decoder-only models, for F.scaled_dot_product_attention, for every kind of cache.

Queries and keys are indexed by their slot in the sequence as held (the cache index, padding included), as
transformers' masks are: causal and sliding-window limits are in slots, not in position ids. A StaticCache
holds its keys in slots 0..L-1 whatever has been written, and its queries sit at its `slot` tensor, so its
masks are built from tensors alone: a compiled decode step reads no number that changes.
"""
from typing import Optional

import torch

from .cache import StaticCache


def slots(cache, n_new: int, device) -> tuple:
    """(query slots (n_new,), key slots (n_keys,)), long, of n_new queries written to `cache`: None (no
    cache), a cache holding `length` keys before them, or a StaticCache (its slot on, over all its slots)."""
    if isinstance(cache, StaticCache):
        return cache.slot + torch.arange(n_new, device=device), torch.arange(cache.max_cache_len, device=device)
    n_past = cache.length if cache is not None else 0
    return torch.arange(n_past, n_past + n_new, device=device), torch.arange(n_past + n_new, device=device)


def attention_mask_for(cache, key_mask, n_new: int, device, window: Optional[int] = None):
    """The mask for n_new queries written to `cache` (see `slots`): (attn_mask, is_causal) for SDPA.

    key_mask: None or (B, n_keys), nonzero for real tokens. window: None, or a query in slot i sees only
    the keys in slots i - window < j <= i (GPT-Neo's local layers, Mistral's sliding window).
    Returns attn_mask None (with is_causal telling SDPA to build the plain causal mask itself; never for a
    StaticCache) or bool, True = attend: (n_new, n_keys) without key_mask, else (B, 1, n_new, n_keys).
    A query always sees its own key, so a padding query never has an all-masked row (whose NaNs would
    reach real tokens through the next layer's values).
    """
    if not isinstance(cache, StaticCache):
        n_past = cache.length if cache is not None else 0
        if key_mask is None and (window is None or window >= n_past + n_new) and (n_past == 0 or n_new == 1):
            return None, n_past == 0 and n_new > 1
    query, key = slots(cache, n_new, device)
    query = query[:, None]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    if key_mask is not None:
        allowed = (allowed & key_mask.bool()[:, None, None, :]) | (key == query)
    return allowed, False
