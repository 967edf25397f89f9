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
