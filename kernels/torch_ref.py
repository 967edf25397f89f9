"""The LoRA matmul in plain torch: the CPU path and the fallback off CUDA.

Same semantics as the Triton kernels (kernels/lora_triton.py), written with
addmm so the base product and the low-rank update accumulate into one buffer.
"""
from typing import Optional

import torch


def lora_fwd_torch(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scale: float, bias: Optional[torch.Tensor] = None):
    """x (M, K), w (K, N), a (K, r), b (r, N), any strides -> (y (M, N), xa (M, r))."""
    xa = x @ a
    y = x @ w if bias is None else torch.addmm(bias, x, w)
    y.addmm_(xa, b, alpha=scale)
    return y, xa


def lora_batched_fwd_torch(x: torch.Tensor, w: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                           scales: torch.Tensor, adapter_index: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mixed-adapter y (M, N): the base product for every row, then each adapter's rows updated.

    x (M, K), w (K, N), a_stack (n, K, r), b_stack (n, r, N), scales (n,),
    adapter_index (M,) with -1 = base only. Differentiable through torch autograd.
    """
    y = x @ w if bias is None else torch.addmm(bias, x, w)
    for i in adapter_index.unique().tolist():
        if i < 0:
            continue
        rows = (adapter_index == i).nonzero().squeeze(1)
        delta = (x.index_select(0, rows) @ a_stack[i]) @ b_stack[i]
        y.index_add_(0, rows, delta, alpha=float(scales[i]))
    return y
