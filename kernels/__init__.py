"""Fused LoRA matmul kernels: `y = x @ W + s * (x @ A) @ B + bias`.

`lora_matmul` is the public entry. CUDA tensors run the Triton kernels
(kernels/lora_triton.py); other devices run the same semantics in torch
(kernels/torch_ref.py). NumPy float64 references live in kernels/reference.py.
"""
from typing import Optional

import torch
from torch import Tensor

from .autograd import lora_matmul_op, use_triton
from .torch_ref import lora_fwd_torch

__all__ = ["lora_matmul", "use_triton"]


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
