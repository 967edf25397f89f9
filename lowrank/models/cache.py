"""Attention key/value caches, one design for every model (gpt-fast's KVCache is the model).

Each keeps one (k, v) per layer, each (B, H, T, head_dim), and gives a layer `update(layer, k, v) -> (all k,
all v)`: the new keys and values appended to what is held.

ConcatCache: the public `past_key_values` layout, extended by concatenation, so gradients flow into a learned
prefix held in it (prefix tuning); what a model's forward(use_cache=True) returns.
KVCache: preallocated buffers written in place, for generation: one step appends one token without copying
what is held (capacity doubles when full, up to max_length).
StaticCache: buffers of one fixed length written at a slot held in a tensor, for a compiled decode step: a
step reads no Python number that changes, so one graph serves every step (models.masks.attention_mask).
"""
from typing import Optional

import torch


class ConcatCache:
    """past: None or one (k, v) per layer, each (B, H, T, head_dim). `layers` is the extended list."""

    def __init__(self, past, n_layer: int):
        self.length = past_length(past, n_layer)  # the model checks the shapes first (models/cache.past_length)
        self.layers = list(past) if past is not None else [None] * n_layer

    def update(self, layer: int, k, v):
        if self.layers[layer] is not None:
            k = torch.cat([self.layers[layer][0], k], dim=2)
            v = torch.cat([self.layers[layer][1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


def past_length(past, n_layer: int, batch=None, heads=None, head_dim=None) -> int:
    """Tokens held by past (None or one (k, v, ...) per layer, k and v (B, H, T, head_dim)); ValueError unless it
    has n_layer layers whose k and v have one shape (and the given batch, heads, head_dim where given)."""
    if past is None:
        return 0
    if not isinstance(past, (list, tuple)) or len(past) != n_layer:
        raise ValueError(f"past_key_values has {len(past) if isinstance(past, (list, tuple)) else type(past).__name__} "
                         f"layers, the model has {n_layer}")
    first = past[0][0] if isinstance(past[0], (list, tuple)) and past[0] else None
    want = (batch, heads, None, head_dim)
    for i, layer in enumerate(past):
        for j, t in enumerate(layer[:2] if isinstance(layer, (list, tuple)) else [layer]):
            ok = (isinstance(t, torch.Tensor) and isinstance(first, torch.Tensor) and t.shape == first.shape
                  and t.dim() == 4 and all(w is None or w == s for w, s in zip(want, t.shape)))
            if not ok:
                raise ValueError(f"past_key_values[{i}][{j}] has shape {tuple(getattr(t, 'shape', ()))}, expected "
                                 f"(batch, heads, tokens, head_dim) = ({batch or 'B'}, {heads or 'H'}, T, "
                                 f"{head_dim or 'head_dim'}), as every layer's k and v")
    return first.size(2)


class KVCache:
    """Preallocated k, v buffers (n_layer, B, H, capacity, head_dim), valid up to `length`.

    key_mask: None when no key is padding, else (B, capacity) bool, True for a real key (keys written later
    are real). positions: (B,) each row's next position id, for models with absolute positions (None until
    set by `advance`). max_length: the most tokens the model can attend over (None: no limit).
    """

    def __init__(self, n_layer: int, batch: int, heads: int, head_dim: int, capacity: int, dtype, device,
                 key_mask: Optional[torch.Tensor] = None, max_length: Optional[int] = None):
        shape = (n_layer, batch, heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.key_mask = None
        if key_mask is not None:
            self.key_mask = torch.ones(batch, capacity, dtype=torch.bool, device=device)
            self.key_mask[:, : key_mask.size(1)] = key_mask.bool()
        self.positions = None
        self.length = 0
        self.max_length = max_length

    def reserve(self, n: int) -> None:
        """Make room for n more tokens (doubling keeps appends amortised O(1) without knowing max_new_tokens)."""
        capacity = self.k.size(3)
        if self.length + n <= capacity:
            return
        capacity = max(2 * capacity, self.length + n)
        if self.max_length is not None:
            capacity = min(self.max_length, capacity)
        grow = lambda buf: torch.cat([buf, buf.new_empty(*buf.shape[:3], capacity - buf.size(3), buf.size(4))], dim=3)
        self.k, self.v = grow(self.k), grow(self.v)
        if self.key_mask is not None:
            pad = self.key_mask.new_ones(self.key_mask.size(0), capacity - self.key_mask.size(1))
            self.key_mask = torch.cat([self.key_mask, pad], dim=1)

    def key_mask_for(self, n_new: int):
        """The key mask of n_new queries about to be written: None or (B, length + n_new)."""
        return None if self.key_mask is None else self.key_mask[:, : self.length + n_new]

    def update(self, layer: int, k, v):
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int, next_positions=None) -> None:
        """Mark n written tokens valid; next_positions (B,): position ids of the next token."""
        self.length += n
        self.positions = next_positions

    def load(self, past) -> None:
        """Write past (one (k, v, ...) per layer, each (B, H, P, head_dim): a learned prefix) as the first P
        tokens."""
        for layer, (k, v, *_) in enumerate(past or ()):
            self.update(layer, k, v)
        self.advance(past_length(past, self.k.size(0)) if past else 0)


class StaticCache:
    """k, v buffers (n_layer, B, H, L, head_dim) of a fixed length L, zero where unwritten (an unwritten value
    meets a zero attention weight: zero, not a stray NaN, keeps the product 0). Layers write at `slot`, and
    attend over all L slots: models.masks.attention_mask hides the slots after the query's.

    slot: () long, the next slot to write; positions: (B,) long, each row's next position id; key_mask: (B, L)
    bool, True for a real key (keys written later are real), held even when no key is padding, so that padded
    and unpadded batches share one compiled step. All are tensors updated in place, marked static for CUDA
    graphs (their addresses stay; a new cache re-records a graph, it does not recompile).
    """

    def __init__(self, n_layer: int, batch: int, heads: int, head_dim: int, max_cache_len: int, dtype, device,
                 key_mask: Optional[torch.Tensor] = None):
        shape = (n_layer, batch, heads, max_cache_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.key_mask = torch.ones(batch, max_cache_len, dtype=torch.bool, device=device)
        if key_mask is not None:
            self.key_mask[:, : key_mask.size(1)] = key_mask.bool()
        for t in (self.k, self.v, self.slot, self.positions, self.key_mask):
            torch._dynamo.mark_static_address(t)

    @property
    def max_cache_len(self) -> int:
        return self.k.size(3)

    def key_mask_for(self, n_new: int):
        """The key mask of every slot, whatever n_new: (B, L)."""
        return self.key_mask

    def update(self, layer: int, k, v):
        """k, v (B, H, T, head_dim) written at slots slot..slot+T-1 -> this layer's whole buffers (B, H, L,
        head_dim)."""
        slots = self.slot + torch.arange(k.size(2), device=k.device)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int, next_positions=None) -> None:
        """Mark n written tokens; next_positions (B,): position ids of the next token."""
        self.slot.add_(n)
        if next_positions is not None:
            self.positions.copy_(next_positions)

    def load(self, past) -> None:
        """Write past (one (k, v, ...) per layer, each (B, H, P, head_dim): a learned prefix) at slots 0..P-1."""
        for layer, (k, v, *_) in enumerate(past or ()):
            self.update(layer, k, v)
        self.advance(past_length(past, self.k.size(0)) if past else 0)


def static_cache_len(needed: int, max_cache_len: Optional[int] = None, limit: Optional[int] = None,
                     minimum: int = 256) -> int:
    """The length of a StaticCache that must hold `needed` tokens: max_cache_len when given (ValueError when
    it is shorter), else `needed` rounded up to a power of two of at least `minimum`, so that prompts of other
    lengths reuse the cache's shape (and a decode step compiled for it); at most `limit` (the model's
    positions, None: no limit), which the caller has checked `needed` against."""
    if max_cache_len is not None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < needed:
            raise ValueError(f"max_cache_len={max_cache_len!r} must be an integer >= {needed} (the prompt, any "
                             f"prefix and the new tokens but the last)")
        return max_cache_len
    length = max(minimum, 1 << (needed - 1).bit_length())
    return length if limit is None else max(needed, min(length, limit))
