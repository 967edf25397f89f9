"""The LoRA matmul as a torch.library custom op with a fake impl and registered autograd.

Registered this way, torch.compile traces `lowrank::lora_matmul` as one opaque
node (no graph break) and autograd calls `_backward` below.

Forward (W frozen):  y = x @ W + s * (x @ A) @ B + bias,  and xa = x @ A is kept.
Backward, with g = dY @ B.T (M, r):
    dX    = dY @ W.T + s * g @ A.T     the same fused op on transposed views,
                                       whose second output is g itself
    dA    = s * X.T @ g                (K, r)
    dB    = s * xa.T @ dY              (r, N), reusing xa from the forward
    dbias = dY summed over rows        (N,)
    dW    = X.T @ dY                   only if W requires grad (full fine-tuning)
"""
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .torch_ref import lora_fwd_torch


def use_triton(x: Tensor) -> bool:
    """CUDA tensors go to Triton; LOWRANK_FORCE_TRITON=1 sends CPU tensors to the interpreter."""
    if x.is_cuda:
        return True
    if os.environ.get("LOWRANK_FORCE_TRITON") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "LOWRANK_FORCE_TRITON=1 with CPU tensors needs TRITON_INTERPRET=1, set before triton is imported"
        )
    return True


@torch.library.custom_op("lowrank::lora_matmul", mutates_args=())
def lora_matmul_op(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float,
                   bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """x (M, K), w (K, N), a (K, r), b (r, N), bias (N,) | None -> (y (M, N), xa (M, r))."""
    if use_triton(x):
        from .lora_triton import lora_fwd  # triton is imported only when a kernel is launched

        return lora_fwd(x, w, a, b, scale, bias)
    return lora_fwd_torch(x, w, a, b, scale, bias)


@lora_matmul_op.register_fake
def _(x, w, a, b, scale, bias):
    return x.new_empty((x.shape[0], w.shape[1])), x.new_empty((x.shape[0], a.shape[1]))


def _setup_context(ctx, inputs, output):
    x, w, a, b, scale, bias = inputs
    ctx.save_for_backward(x, w, a, b, output[1])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy: Tensor, _dxa: Tensor):
    x, w, a, b, xa = ctx.saved_tensors
    s = ctx.scale
    need_dx, need_dw, need_da, need_db, _, need_dbias = ctx.needs_input_grad
    dx = dw = da = db = dbias = None
    if need_dx:
        dx, g = lora_matmul_op(dy, w.T, b.T, a.T, s, None)
    elif need_da:
        g = dy @ b.T
    if need_da:
        da = (x.T @ g).mul_(s)
    if need_db:
        db = (xa.T @ dy).mul_(s)
    if need_dw:
        dw = x.T @ dy
    if need_dbias:
        dbias = dy.sum(0)
    return dx, dw, da, db, None, dbias


lora_matmul_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lowrank::lora_matmul_batched", mutates_args=())
def lora_matmul_batched_op(x: Tensor, w: Tensor, a_stack: Tensor, b_stack: Tensor, scales: Tensor,
                           order: Tensor, idx_sorted: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Triton mixed-adapter forward: (y (M, N), xa (M, r) in sorted row order). See kernels/batched.py."""
    from .batched import lora_batched_fwd

    return lora_batched_fwd(x, w, a_stack, b_stack, scales, order, idx_sorted, bias)


@lora_matmul_batched_op.register_fake
def _(x, w, a_stack, b_stack, scales, order, idx_sorted, bias):
    return x.new_empty((x.shape[0], w.shape[1])), x.new_empty((x.shape[0], a_stack.shape[2]))


def _setup_batched_context(ctx, inputs, output):
    x, w, a_stack, b_stack, scales, order, idx_sorted, bias = inputs
    ctx.save_for_backward(x, w, a_stack, b_stack, scales, order, idx_sorted, output[1])
    ctx.mark_non_differentiable(output[1])


def _batched_backward(ctx, dy: Tensor, _dxa: Tensor):
    """Per row m with adapter i (g = dY @ B_i.T): dX as in the single-adapter case, on
    the transposed stacks; dA_i and dB_i sum over the rows of adapter i, one
    contiguous segment of the sorted order each."""
    x, w, a_stack, b_stack, scales, order, idx_sorted, xa = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db = ctx.needs_input_grad[:4]
    dx, g = lora_matmul_batched_op(dy, w.T, b_stack.transpose(1, 2), a_stack.transpose(1, 2),
                                   scales, order, idx_sorted, None)
    da = torch.zeros_like(a_stack) if need_da else None
    db = torch.zeros_like(b_stack) if need_db else None
    if need_da or need_db:
        counts = torch.bincount(idx_sorted.long() + 1, minlength=a_stack.shape[0] + 1).tolist()
        start = counts[0]  # base-only rows sort first
        for i, count in enumerate(counts[1:]):
            if count == 0:
                continue
            seg = slice(start, start + count)
            rows = order[seg]
            s = scales[i].to(x.dtype)
            if need_da:
                da[i] = (x.index_select(0, rows).T @ g[seg]) * s
            if need_db:
                db[i] = (xa[seg].T @ dy.index_select(0, rows)) * s
            start += count
    dw = x.T @ dy if need_dw else None
    dbias = dy.sum(0) if ctx.needs_input_grad[7] else None
    return dx if need_dx else None, dw, da, db, None, None, None, dbias


lora_matmul_batched_op.register_autograd(_batched_backward, setup_context=_setup_batched_context)
