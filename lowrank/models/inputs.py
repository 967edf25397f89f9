"""The checks every model's forward runs on its inputs, once, before any layer: ValueError or TypeError
naming the argument, its shape or the offending value (a token id past the vocabulary would otherwise be a
bare IndexError on the CPU and a device-side assert on a GPU).

Shapes, dtypes and types are checked everywhere. Checks that read tensor values run in eager calls only
(`values_checked`): reading a value is a host sync, and under torch.compile a graph break; a compiled model
meets the same inputs in eager first when a user debugs it, and the shape checks still run at trace time.
"""
import torch


def values_checked() -> bool:
    """Whether checks that read tensor values run here: in eager calls, not while torch.compile traces."""
    return not torch.compiler.is_compiling()


def check_token_ids(ids: torch.Tensor, name: str, vocab_size: int, allowed=()) -> None:
    """ids: an integer tensor (B, T) with B, T >= 1 and every id in [0, vocab_size) or in `allowed`
    (labels allow -100)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (int64 or int32), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}: expected (batch, sequence); for one sequence "
                         f"use {name}[None]")
    if 0 in ids.shape:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}: needs at least one row and one token")
    if not values_checked():
        return
    bad = (ids < 0) | (ids >= vocab_size)
    for value in allowed:
        bad &= ids != value
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}[{row}, {col}] = {int(ids[row, col])} is outside the vocabulary "
                         f"[0, {vocab_size})")


def check_embeddings(embeds: torch.Tensor, name: str, hidden: int) -> None:
    """embeds: a floating tensor (B, T, hidden) with B, T >= 1."""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                        f"{getattr(embeds, 'dtype', type(embeds).__name__)}")
    if embeds.dim() != 3 or embeds.shape[-1] != hidden or 0 in embeds.shape:
        raise ValueError(f"{name} has shape {tuple(embeds.shape)}, expected (batch >= 1, sequence >= 1, {hidden})")


def check_inputs(input_ids, inputs_embeds, vocab_size: int, hidden: int, names=("input_ids", "inputs_embeds")):
    """Exactly one of input_ids (B, T) and inputs_embeds (B, T, hidden), each checked -> (B, T)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"pass exactly one of {names[0]} or {names[1]}")
    if input_ids is not None:
        check_token_ids(input_ids, names[0], vocab_size)
        return tuple(input_ids.shape)
    check_embeddings(inputs_embeds, names[1], hidden)
    return tuple(inputs_embeds.shape[:2])


def check_mask(mask, name: str, shape: tuple, what: str) -> None:
    """mask: None or a tensor of `shape` (`what` says what its dimensions are)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} ({what})")


def check_attention_mask(mask, name: str, shape: tuple, what: str) -> None:
    """check_mask, and every value 0 or 1 (a NaN or a 2 is no mask: it would be read as ones)."""
    check_mask(mask, name, shape, what)
    if mask is not None and values_checked() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold 0 (padding) and 1 (a real token) only, got values "
                         f"{sorted(set(mask[(mask != 0) & (mask != 1)].flatten().tolist()))[:5]}")


def check_positions(position_ids, n_positions: int, batch: int, length: int) -> None:
    """position_ids: None or integers in [0, n_positions), shape (batch or 1, length)."""
    if position_ids is None:
        return
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"position_ids must be an int64 or int32 tensor, got "
                        f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
    if position_ids.is_floating_point() or position_ids.dim() != 2 or position_ids.shape[1] != length \
            or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)} and dtype {position_ids.dtype}, "
                         f"expected integers of shape ({batch} or 1, {length})")
    if values_checked() and bool(((position_ids < 0) | (position_ids >= n_positions)).any()):
        raise ValueError(f"position_ids holds {int(position_ids.min())}..{int(position_ids.max())}, outside "
                         f"[0, n_positions={n_positions})")


def key_mask_of(attention_mask):
    """attention_mask (B, T) (checked) -> the bool key mask the bodies take: None (every key real, so SDPA
    takes its causal fast path) when the mask is absent or, in eager calls, all ones. Under torch.compile a
    given mask is always kept: whether it is all ones is a value, and branching on it would break the graph
    (the results agree; SDPA then applies the mask instead of is_causal)."""
    if attention_mask is None or (values_checked() and bool(attention_mask.all())):
        return None
    return attention_mask.bool()
