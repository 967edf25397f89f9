"""NumPy float64 references for the LoRA matmul, its gradients, and the batched form.

Nothing here imports torch: these are the outside witnesses the kernels are
checked against. Shapes follow DESIGN.md: x (M, K), W (K, N), A (K, r), B (r, N).

    y   = x @ W + s * (x @ A) @ B + bias
    g   = dY @ B.T                      (M, r)
    dX  = dY @ W.T + s * g @ A.T        (M, K)
    dA  = s * x.T @ g                   (K, r)
    dB  = s * (x @ A).T @ dY            (r, N)
    dbias = dY summed over rows         (N,)
"""
import numpy as np


def _f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


def lora_forward(x, W, A, B, scale, bias=None):
    """y (M, N) in float64."""
    x, W, A, B, bias = _f64(x, W, A, B, bias)
    y = x @ W + scale * ((x @ A) @ B)
    return y if bias is None else y + bias


def lora_backward(x, W, A, B, scale, dY):
    """Gradients (dX, dA, dB, dbias) in float64 for the upstream gradient dY (M, N)."""
    x, W, A, B, dY = _f64(x, W, A, B, dY)
    g = dY @ B.T
    dX = dY @ W.T + scale * (g @ A.T)
    dA = scale * (x.T @ g)
    dB = scale * ((x @ A).T @ dY)
    return dX, dA, dB, dY.sum(axis=0)


def merged_weight(W, A, B, scale):
    """W' = W + s * A @ B, (K, N): the dense weight the fused product must equal."""
    W, A, B = _f64(W, A, B)
    return W + scale * (A @ B)
