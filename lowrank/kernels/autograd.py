"""The LoRA matmul as a torch.library custom op with a fake impl, registered autograd and autocast.

Registered this way, torch.compile traces `lowrank::lora_matmul` as one opaque
node (no graph break) and autograd calls `_backward` below.

Forward (W frozen), D = keep * x / (1 - p) with LoRA dropout (keep regenerated
from the seed, never stored), D = x without:
    y = x @ W + s * (D @ A) @ B + bias,  and xa = D @ A is kept.
Backward, with g = dY @ B.T (M, r):
    dX    = dY @ W.T + keep/(1-p) * (s * g @ A.T)   the same fused op on transposed
                                       views, mask on its output; its second output is g
    dA    = s * D.T @ g                (K, r)
    dB    = s * xa.T @ dY              (r, N), reusing xa from the forward
    dbias = dY summed over rows        (N,)
    dW    = X.T @ dY                   only if W requires grad (full fine-tuning)
A and B may be fp32 while x and W are 16-bit: g, xa, dA and dB are then fp32 and
dX has x's dtype. Under torch.autocast x, W and bias take the autocast dtype and
A, B keep theirs (`autocast_operands`).
"""
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .torch_path import DROPOUT_INPUT, DROPOUT_OUTPUT, dropped_t_matmul_torch, lora_fwd_torch


# Triton reads TRITON_INTERPRET when imported, so only a process started with it can run the kernels on
# CPU tensors; any other skips the per-call environment lookups (a decode step pays them per layer), and
# LOWRANK_FORCE_TRITON=1 there is refused at the first call as before.
_INTERPRETER_AT_START = os.environ.get("TRITON_INTERPRET") == "1"
_FORCED_AT_START = os.environ.get("LOWRANK_FORCE_TRITON") == "1"


def use_triton(x: Tensor) -> bool:
    """CUDA tensors go to Triton; LOWRANK_FORCE_TRITON=1 sends CPU tensors to the interpreter (which needs
    TRITON_INTERPRET=1, set before the process imports triton)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"use_triton: x must be a tensor, got {type(x).__name__}")
    if x.is_cuda:
        return True
    if not (_INTERPRETER_AT_START or _FORCED_AT_START):
        return False
    if os.environ.get("LOWRANK_FORCE_TRITON") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "LOWRANK_FORCE_TRITON=1 with CPU tensors needs TRITON_INTERPRET=1, set before triton is imported"
        )
    return True


def _fused(x, w, a, b, scale, bias, dropout_p, seed, dropout):
    """(y, xa) from the Triton kernels (CUDA, or forced) or the torch path; see lora_triton.lora_fwd."""
    if use_triton(x):
        from .lora_triton import lora_fwd  # triton is imported only when a kernel is launched

        return lora_fwd(x, w, a, b, scale, bias, dropout_p, seed, dropout)
    return lora_fwd_torch(x, w, a, b, scale, bias, dropout_p, seed, dropout)


# The backward's two mask-dependent products are ops of their own: opaque to tracing, which cannot follow
# the torch path's seeded generator, and one launch each on the Triton path.
@torch.library.custom_op("lowrank::lora_matmul_dx", mutates_args=())
def lora_matmul_dx_op(dy: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float,
                      seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(dX = dY @ W.T + keep/(1-p) * (s * g @ A.T) (M, K), g = dY @ B.T (M, r)) for dy (M, N)."""
    return _fused(dy, w.T, b.T, a.T, scale, None, dropout_p, seed, DROPOUT_OUTPUT)


@lora_matmul_dx_op.register_fake
def _(dy, w, a, b, scale, dropout_p, seed):
    return dy.new_empty((dy.shape[0], w.shape[0])), b.new_empty((dy.shape[0], b.shape[0]))


@torch.library.custom_op("lowrank::lora_dropped_t_matmul", mutates_args=())
def lora_dropped_t_matmul_op(x: Tensor, g: Tensor, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """D.T @ g (K, r) in g's dtype, D the forward's dropped-out x (M, K), for g (M, r): dA / s."""
    if use_triton(x):
        from .lora_triton import dropped_t_matmul

        return dropped_t_matmul(x, g, dropout_p, seed)
    return dropped_t_matmul_torch(x, g, dropout_p, seed)


@lora_dropped_t_matmul_op.register_fake
def _(x, g, dropout_p, seed):
    return g.new_empty((x.shape[1], g.shape[1]))


@torch.library.custom_op("lowrank::lora_matmul", mutates_args=())
def lora_matmul_op(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, bias: Optional[Tensor],
                   dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """x (M, K), w (K, N), a (K, r), b (r, N), bias (N,) | None -> (y (M, N), xa (M, r) in a's dtype).
    seed: the dropout mask's (1,) int64 seed on x's device (None when dropout_p is 0)."""
    return _fused(x, w, a, b, scale, bias, dropout_p, seed, DROPOUT_INPUT)


@lora_matmul_op.register_fake
def _(x, w, a, b, scale, bias, dropout_p, seed):
    return x.new_empty((x.shape[0], w.shape[1])), a.new_empty((x.shape[0], a.shape[1]))


def _setup_context(ctx, inputs, output):
    x, w, a, b, scale, bias, dropout_p, seed = inputs
    ctx.save_for_backward(x, w, a, b, output[1], seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy: Tensor, _dxa: Tensor):
    x, w, a, b, xa, seed = ctx.saved_tensors
    s, p = ctx.scale, ctx.dropout_p
    need_dx, need_dw, need_da, need_db, _, need_dbias = ctx.needs_input_grad[:6]
    dx = dw = da = db = dbias = None
    if need_dx:
        dx, g = lora_matmul_dx_op(dy, w, a, b, s, p, seed)
    elif need_da:
        g = dy.to(b.dtype) @ b.T
    if need_da:
        da = lora_dropped_t_matmul_op(x, g, p, seed).mul_(s)
    if need_db:
        db = (xa.T @ dy.to(xa.dtype)).mul_(s)
    if need_dw:
        dw = x.T @ dy
    if need_dbias:
        dbias = dy.sum(0)
    return dx, dw, da, db, None, dbias, None, None


lora_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def autocast_operands(x: Tensor, w: Tensor, bias: Optional[Tensor], device_type: str):
    """(x, w, bias) in the autocast dtype of `device_type`, as F.linear takes them under autocast; the
    adapters are not among them: fp32 A and B stay fp32."""
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
    return cast(x), cast(w), cast(bias)


def _autocast_rule(device_type: str):
    def rule(x, w, a, b, scale, bias, dropout_p, seed):
        x, w, bias = autocast_operands(x, w, bias, device_type)
        with torch.autocast(device_type, enabled=False):  # excludes this key: the op runs as called
            return lora_matmul_op(x, w, a, b, scale, bias, dropout_p, seed)
    return rule


_autocast_library = torch.library.Library("lowrank", "IMPL")
for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _autocast_library.impl("lora_matmul", _autocast_rule(_device_type), _key)


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
    """Per row m with adapter i (g = dY @ B_i.T): dX as in the single-adapter case, on the transposed
    stacks; dA_i and dB_i sum over the rows of adapter i. All adapters at once: g and xa (M, r) spread to
    n * r columns, each row's own adapter's r of them kept and the rest zeroed (kernels.torch_path's
    lora_batched_fwd_torch does the same), so one product serves every adapter: no loop over the adapters
    present, no host sync, nothing data-dependent to trace."""
    x, w, a_stack, b_stack, scales, order, idx_sorted, xa = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db = ctx.needs_input_grad[:4]
    dx, g = lora_matmul_batched_op(dy, w.T, b_stack.transpose(1, 2), a_stack.transpose(1, 2),
                                   scales, order, idx_sorted, None)
    da = db = None
    if need_da or need_db:
        n, K, r = a_stack.shape
        own = idx_sorted[:, None] == torch.arange(n, device=x.device).repeat_interleave(r)  # (M, n r), sorted rows
        scale = scales.to(x.dtype)[:, None, None]
        if need_da:
            da = (x.index_select(0, order).T @ (g.repeat(1, n) * own)).view(K, n, r).transpose(0, 1) * scale
        if need_db:
            db = ((xa.repeat(1, n) * own).T @ dy.index_select(0, order)).view(n, r, -1) * scale
    dw = x.T @ dy if need_dw else None
    dbias = dy.sum(0) if ctx.needs_input_grad[7] else None
    return dx if need_dx else None, dw, da, db, None, None, None, dbias


lora_matmul_batched_op.register_autograd(_batched_backward, setup_context=_setup_batched_context)
