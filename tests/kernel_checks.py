"""Helpers shared by the kernel property tests: backends, strided operands, the tolerance rule."""
import contextlib
import os

import numpy as np
import torch

from lowrank import kernels

from .helpers import TOLERANCE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided"]


@contextlib.contextmanager
def backend(name):
    """'torch': the CPU path; 'triton': the Triton kernels (interpreted without a GPU)."""
    old = os.environ.get("LOWRANK_FORCE_TRITON")
    os.environ["LOWRANK_FORCE_TRITON"] = "1" if name == "triton" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOWRANK_FORCE_TRITON"]
        else:
            os.environ["LOWRANK_FORCE_TRITON"] = old


def make(shape, layout, dtype, gen, device):
    """A (rows, cols) tensor of N(0, 1) data stored in the given layout."""
    rows, cols = shape
    if layout == "transposed":
        t = torch.randn(cols, rows, generator=gen).T
    elif layout == "strided":
        t = torch.randn(rows, 2 * cols + 1, generator=gen)[:, 1::2]
    else:
        t = torch.randn(rows, cols, generator=gen)
    return t.to(device=device, dtype=dtype)


def keep_of(M, K, p, seed, backend_name):
    """keep / (1 - p), (M, K) float64: the mask lora_matmul uses for these sizes and seed (with identity
    adapters, W = 0 and s = 1 the output is the dropped input itself)."""
    with backend(backend_name):
        eye = torch.eye(K)
        return to64(kernels.lora_matmul(torch.ones(M, K), torch.zeros(K, K), eye, eye, 1.0, dropout_p=p, seed=seed))


def to64(t):
    return t.detach().double().cpu().numpy()


def assert_matches(name, got, ref64, lowp, dtype):
    """max|got - ref| <= 2 * max|lowp - ref| + tol * max|ref|."""
    got, lowp = to64(got), to64(lowp)
    scale = max(np.abs(ref64).max(initial=0.0), 1.0)
    err, base_err = np.abs(got - ref64).max(initial=0.0), np.abs(lowp - ref64).max(initial=0.0)
    bound = 2 * base_err + TOLERANCE[dtype] * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch {dtype}: {base_err:.3e})"
