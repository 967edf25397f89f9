"""Attention masks of decoder-only models, for F.scaled_dot_product_attention.

Queries and keys are indexed by their slot in the sequence as held (the cache index, padding included), as
transformers' masks are: causal and sliding-window limits are in slots, not in position ids.
"""
from typing import Optional

import torch


def attention_mask_for(key_mask, n_new: int, n_keys: int, device, window: Optional[int] = None):
    """The mask for n_new queries that follow n_keys - n_new held keys: (attn_mask, is_causal) for SDPA.

    key_mask: None or (B, n_keys), nonzero for real tokens. window: None, or a query in slot i sees only
    the keys in slots i - window < j <= i (GPT-Neo's local layers, Mistral's sliding window).
    Returns attn_mask None (with is_causal telling SDPA to build the plain causal mask itself) or bool,
    True = attend: (n_new, n_keys) without key_mask, else (B, 1, n_new, n_keys).
    A query always sees its own key, so a padding query never has an all-masked row (whose NaNs would
    reach real tokens through the next layer's values).
    """
    n_past = n_keys - n_new
    windowed = window is not None and window < n_keys
    if key_mask is None and not windowed and (n_past == 0 or n_new == 1):
        return None, n_past == 0 and n_new > 1
    query_pos = torch.arange(n_past, n_keys, device=device)[:, None]
    key_pos = torch.arange(n_keys, device=device)
    allowed = key_pos <= query_pos
    if windowed:
        allowed &= key_pos > query_pos - window
    if key_mask is not None:
        allowed = (allowed & key_mask.bool()[:, None, None, :]) | (key_pos == query_pos)
    return allowed, False
