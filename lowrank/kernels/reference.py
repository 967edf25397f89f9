"""NumPy float64 references for the LoRA matmul, its gradients, and the batched form.

Nothing here imports torch: these are the outside witnesses the kernels are
checked against. Shapes follow docs/equation.md 1: x (M, K), W (K, N), A (K, r), B (r, N).

    y   = x @ W + s * (D @ A) @ B + bias
    g   = dY @ B.T                      (M, r)
    dX  = dY @ W.T + keep * (s * g @ A.T)   (M, K)
    dA  = s * D.T @ g                   (K, r)
    dB  = s * (D @ A).T @ dY            (r, N)
    dbias = dY summed over rows         (N,)

with LoRA dropout's D = keep * x, keep (M, K) the mask divided by (1 - p): the
kernels' mask is recovered from an identity-adapter call (see the tests); without
dropout keep is 1 and D = x.
"""
import numpy as np


def _f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


def lora_forward(x, W, A, B, scale, bias=None, keep=None):
    """y (M, N) in float64; keep (M, K): LoRA dropout's mask / (1 - p), or None for no dropout."""
    x, W, A, B, bias, keep = _f64(x, W, A, B, bias, keep)
    d = x if keep is None else keep * x
    y = x @ W + scale * ((d @ A) @ B)
    return y if bias is None else y + bias


def lora_backward(x, W, A, B, scale, dY, keep=None):
    """Gradients (dX, dA, dB, dbias) in float64 for the upstream gradient dY (M, N); keep as in lora_forward."""
    x, W, A, B, dY, keep = _f64(x, W, A, B, dY, keep)
    d = x if keep is None else keep * x
    g = dY @ B.T
    dX_low_rank = scale * (g @ A.T)
    dX = dY @ W.T + (dX_low_rank if keep is None else keep * dX_low_rank)
    dA = scale * (d.T @ g)
    dB = scale * ((d @ A).T @ dY)
    return dX, dA, dB, dY.sum(axis=0)


def merged_weight(W, A, B, scale):
    """W' = W + s * A @ B, (K, N): the dense weight the fused product must equal."""
    W, A, B = _f64(W, A, B)
    return W + scale * (A @ B)


def lora_batched_forward(x, W, A_stack, B_stack, scales, adapter_index, bias=None):
    """Mixed-adapter y (M, N), row by row: y[m] = x[m] @ W + s[i] * (x[m] @ A[i]) @ B[i] (+ bias), i = index[m].

    A_stack (n, K, r), B_stack (n, r, N), scales (n,), adapter_index (M,) with -1 = base only.
    """
    x, W, A_stack, B_stack, scales, bias = _f64(x, W, A_stack, B_stack, scales, bias)
    y = x @ W
    for m, i in enumerate(np.asarray(adapter_index)):
        if i >= 0:
            y[m] += scales[i] * ((x[m] @ A_stack[i]) @ B_stack[i])
    return y if bias is None else y + bias


def lora_batched_backward(x, W, A_stack, B_stack, scales, adapter_index, dY):
    """Gradients (dX, dA_stack, dB_stack, dbias) of the mixed-adapter product, row by row."""
    x, W, A_stack, B_stack, scales, dY = _f64(x, W, A_stack, B_stack, scales, dY)
    dX = dY @ W.T
    dA, dB = np.zeros_like(A_stack), np.zeros_like(B_stack)
    for m, i in enumerate(np.asarray(adapter_index)):
        if i < 0:
            continue
        g = dY[m] @ B_stack[i].T
        dX[m] += scales[i] * (g @ A_stack[i].T)
        dA[i] += scales[i] * np.outer(x[m], g)
        dB[i] += scales[i] * np.outer(x[m] @ A_stack[i], dY[m])
    return dX, dA, dB, dY.sum(axis=0)
