"""The LoRA matmul in plain torch: the CPU path and the fallback off CUDA.

Same semantics as the Triton kernels (kernels/lora_triton.py), written with
addmm so the base product and the low-rank update accumulate into one buffer.
"""
from typing import Optional

import torch
import torch.nn.functional as F

# Where LoRA dropout's mask applies, for both paths: the forward's input x (the low-rank path sees
# D = keep * x / (1 - p)), or the backward's dX, whose low-rank term is masked at x's coordinates.
NO_DROPOUT, DROPOUT_INPUT, DROPOUT_OUTPUT = 0, 1, 2


def keep_scale(seed, shape, p: float, device, dtype) -> torch.Tensor:
    """keep / (1 - p), `shape` (M, K): the torch path's dropout mask, drawn from a private generator seeded
    with `seed` (an int, or the kernels' one-element seed tensor), so the backward regenerates the forward's
    mask instead of storing it."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(dtype) / (1 - p)


def lora_fwd_torch(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scale: float, bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                   seed=0, dropout: int = DROPOUT_INPUT):
    """x (M, K), w (K, N), a (K, r), b (r, N), any strides -> (y (M, N) in x's dtype, xa (M, r) in a's).

    x, w, bias share a dtype; a, b have it too or are fp32 (the low-rank term is then added in fp32, to
    the base product rounded once, before the rounding to x's dtype, as PEFT adds fp32 adapters). With
    dropout_p > 0 the mask of `seed` applies where `dropout` says (see DROPOUT_INPUT, DROPOUT_OUTPUT);
    seed None (input dropout only) draws it from torch's default generator instead.
    """
    if dropout_p == 0 and a.dtype == x.dtype:  # the common case, without the branches below (decode)
        xa = x @ a
        y = x @ w if bias is None else torch.addmm(bias, x, w)
        return y.addmm_(xa, b, alpha=scale), xa
    masked = dropout_p > 0
    d = x.to(a.dtype)
    if masked and dropout == DROPOUT_INPUT:
        # seed None: torch's own dropout on its default generator (autograd keeps the mask, as PEFT's does)
        d = (F.dropout(d, dropout_p) if seed is None else d * keep_scale(seed, x.shape, dropout_p, x.device, a.dtype))
    xa = d @ a
    y = x @ w if bias is None else torch.addmm(bias, x, w)
    if masked and dropout == DROPOUT_OUTPUT:
        low_rank = (xa @ b) * keep_scale(seed, y.shape, dropout_p, x.device, a.dtype)
        return (y.to(a.dtype) + scale * low_rank).to(x.dtype), xa
    return y.to(a.dtype).addmm_(xa, b, alpha=scale).to(x.dtype), xa


def dropped_t_matmul_torch(x: torch.Tensor, g: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    """D.T @ g, (K, r), for x (M, K) and g (M, r): D = x times the mask of `seed` (x alone for p = 0),
    in g's dtype: the backward's dA / s."""
    d = x.to(g.dtype)
    if dropout_p > 0:
        d = d * keep_scale(seed, x.shape, dropout_p, x.device, g.dtype)
    return d.T @ g


def lora_batched_fwd_torch(x: torch.Tensor, w: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                           scales: torch.Tensor, adapter_index: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mixed-adapter y (M, N): the base product for every row plus its own adapter's low-rank term.

    x (M, K), w (K, N), a_stack (n, K, r), b_stack (n, r, N), scales (n,), adapter_index (M,) with -1 =
    base only. The n adapters run as one product of rank n * r, A = [A_0 | A_1 | ...] and B = [B_0; B_1; ...],
    with each row's columns of the other adapters zeroed: no loop over the adapters present, so nothing reads
    the index on the host and torch.compile traces it whole. Differentiable through torch autograd. With
    16-bit operands the low-rank terms are computed and added in fp32 and y is rounded once, as the kernels
    do (so the backward, through the same ops, rounds each gradient once too).
    """
    n, K, r = a_stack.shape
    y = x @ w if bias is None else torch.addmm(bias, x, w)
    low = y.element_size() == 2
    dtype = torch.float32 if low else y.dtype
    column_adapter = torch.arange(n, device=x.device).repeat_interleave(r)  # (n r,): the adapter of each column
    own = adapter_index[:, None] == column_adapter  # (M, n r)
    xa = (x.to(dtype) @ a_stack.permute(1, 0, 2).reshape(K, n * r).to(dtype)) * own
    row_scale = scales.to(dtype)[adapter_index.clamp(min=0)] * (adapter_index >= 0)  # (M,)
    acc = y.to(dtype).addcmul_(row_scale[:, None], xa @ b_stack.reshape(n * r, -1).to(dtype))
    return acc.to(y.dtype) if low else acc
