"""Fused LoRA matmul kernels: `y = x @ W + s * (x @ A) @ B + bias`.

`lora_matmul` is the public entry; `lora_matmul_batched` is the mixed-adapter
form, one adapter per row (kernels/batched.py). CUDA tensors run the Triton kernels
(kernels/lora_triton.py); other devices run the same semantics in torch
(kernels/torch_ref.py). NumPy float64 references live in kernels/reference.py.
"""
from typing import Optional

import torch
from torch import Tensor

from .autograd import lora_matmul_batched_op, lora_matmul_op, use_triton
from .torch_ref import lora_batched_fwd_torch, lora_fwd_torch

__all__ = ["lora_matmul", "lora_matmul_batched", "use_triton"]


def _check(x: Tensor, w: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor]) -> None:
    named = {"x": x, "W": w, "A": a, "B": b}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not t.is_floating_point():
            raise TypeError(f"lora_matmul: {name} has dtype {t.dtype}; expected a floating dtype")
        if t.dtype != x.dtype:
            raise TypeError(f"lora_matmul: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"lora_matmul: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1 or w.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"lora_matmul: expected x (..., K), W (K, N), A (K, r), B (r, N); got x {tuple(x.shape)}, "
            f"W {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}"
        )
    K, N = w.shape
    r = a.shape[1]
    if r < 1:
        raise ValueError(f"lora_matmul: rank must be at least 1; A has shape {tuple(a.shape)}")
    if x.shape[-1] != K or a.shape[0] != K:
        raise ValueError(
            f"lora_matmul: K mismatch: x {tuple(x.shape)}, W {tuple(w.shape)} and A {tuple(a.shape)} "
            f"must agree on K={K}"
        )
    if b.shape != (r, N):
        raise ValueError(f"lora_matmul: B has shape {tuple(b.shape)}, expected (r, N) = ({r}, {N})")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"lora_matmul: bias has shape {tuple(bias.shape)}, expected ({N},)")


def lora_matmul(x: Tensor, W: Tensor, A: Tensor, B: Tensor, scale: float, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W + scale * (x @ A) @ B + bias.

    x: (..., K); W: (K, N), any strides (an nn.Linear weight's `.T`, a Conv1D
    weight); A: (K, r) and B: (r, N), any strides (PEFT's `lora_A.weight.T`,
    `lora_B.weight.T`); bias: (N,) or None. One floating dtype for all; fp16 and
    bf16 accumulate in fp32. Returns (..., N) in x's dtype. Differentiable in
    x, A, B, bias (and W, if it requires grad).
    """
    _check(x, W, A, B, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if use_triton(x):
        y, _ = lora_matmul_op(x2, W, A, B, float(scale), bias)
    else:
        # Plain torch ops: autograd and torch.compile see through them, and eager
        # calls skip the custom op's dispatch cost (about 0.1 ms, a decode step's worth).
        y, _ = lora_fwd_torch(x2, W, A, B, float(scale), bias)
    return y.reshape(*x.shape[:-1], W.shape[1])


def _check_batched(x, w, a_stack, b_stack, scales, adapter_index, bias) -> None:
    if a_stack.dim() != 3 or b_stack.dim() != 3:
        raise ValueError(f"lora_matmul_batched: expected A_stack (n, K, r) and B_stack (n, r, N); got "
                         f"{tuple(a_stack.shape)} and {tuple(b_stack.shape)}")
    n, K = a_stack.shape[:2]
    if n < 1 or b_stack.shape[0] != n:
        raise ValueError(f"lora_matmul_batched: A_stack holds {n} adapters and B_stack {b_stack.shape[0]}; "
                         "need the same number, at least 1")
    _check(x, w, a_stack[0], b_stack[0], bias)
    if scales.shape != (n,):
        raise ValueError(f"lora_matmul_batched: scales has shape {tuple(scales.shape)}, expected ({n},)")
    if adapter_index.dtype not in (torch.int32, torch.int64) or adapter_index.numel() != x.numel() // max(K, 1):
        raise ValueError(f"lora_matmul_batched: adapter_index must be int32/int64 with one entry per row of x "
                         f"({x.numel() // max(K, 1)}); got {adapter_index.dtype} {tuple(adapter_index.shape)}")
    if adapter_index.numel() and (int(adapter_index.min()) < -1 or int(adapter_index.max()) >= n):
        raise ValueError(f"lora_matmul_batched: adapter_index values must lie in [-1, {n - 1}]; got "
                         f"[{int(adapter_index.min())}, {int(adapter_index.max())}]")


def lora_matmul_batched(x: Tensor, W: Tensor, A_stack: Tensor, B_stack: Tensor, scales, adapter_index: Tensor,
                        bias: Optional[Tensor] = None) -> Tensor:
    """Mixed-adapter LoRA: y[m] = x[m] @ W + s[i] * (x[m] @ A_stack[i]) @ B_stack[i] + bias, i = adapter_index[m].

    x: (..., K); W: (K, N); A_stack: (n, K, r); B_stack: (n, r, N), any strides
    (adapters of lower rank zero-padded to r); scales: (n,) tensor or sequence
    of floats; adapter_index: (...) integer, one per row of x, -1 = base only.
    One launch per call on CUDA whatever the mix of adapters. Returns (..., N).
    Differentiable in x, A_stack, B_stack, bias.
    """
    scales = torch.as_tensor(scales, dtype=torch.float32, device=x.device)
    _check_batched(x, W, A_stack, B_stack, scales, adapter_index, bias)
    x2, index = x.reshape(-1, x.shape[-1]), adapter_index.reshape(-1).to(x.device)
    if use_triton(x):
        order = torch.argsort(index, stable=True)
        y, _ = lora_matmul_batched_op(x2, W, A_stack, B_stack, scales, order, index[order].to(torch.int32), bias)
    else:
        y = lora_batched_fwd_torch(x2, W, A_stack, B_stack, scales, index, bias)
    return y.reshape(*x.shape[:-1], W.shape[1])
