"""Properties of kernels.lora_matmul_batched (one adapter per row): equal to the
row-by-row float64 reference and to running each row through
kernels.lora_matmul with its own adapter, forward and backward, for every
backend, dtype, mix of adapters (base-only rows included) and padded rank."""
import numpy as np
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from lowrank import kernels
from lowrank.kernels import reference

from .kernel_checks import DTYPES, LAYOUTS, assert_matches, backend, make, to64


@st.composite
def batched_problems(draw, max_dim=64, max_m=80, max_adapters=6):
    n = draw(st.integers(1, max_adapters))
    r_max = draw(st.one_of(st.integers(1, 16), st.just(65)))
    return dict(
        M=draw(st.one_of(st.just(1), st.integers(1, max_m))),
        K=draw(st.integers(1, max_dim)),
        N=draw(st.integers(1, max_dim)),
        n=n,
        r_max=r_max,
        ranks=draw(st.lists(st.integers(1, r_max), min_size=n, max_size=n)),
        base_rows=draw(st.sampled_from([0.0, 0.3, 1.0])),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        w_layout=draw(st.sampled_from(LAYOUTS)),
        b_transposed=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(p, dtype, device):
    gen = torch.Generator().manual_seed(p["seed"])
    M, K, N, n, r = p["M"], p["K"], p["N"], p["n"], p["r_max"]
    x = make((M, K), p["x_layout"], dtype, gen, device)
    W = make((K, N), p["w_layout"], dtype, gen, device) / K ** 0.5
    A = torch.randn(n, K, r, generator=gen) / K ** 0.5
    # PEFT stacks lora_B weights (N, r): the kernel sees them through a transposed view.
    B = torch.randn(n, N, r, generator=gen).transpose(1, 2) if p["b_transposed"] else torch.randn(n, r, N, generator=gen)
    B = B / r ** 0.5
    for i, rank in enumerate(p["ranks"]):  # lower ranks are zero-padded to r_max
        A[i, :, rank:] = 0
        B[i, rank:, :] = 0
    scales = torch.randn(n, generator=gen) * 2
    index = torch.randint(0, n, (M,), generator=gen)
    index[torch.rand(M, generator=gen) < p["base_rows"]] = -1
    bias = torch.randn(N, generator=gen).to(device, dtype) if p["bias"] else None
    return x, W, A.to(device, dtype), B.to(device, dtype), scales, index.to(device), bias


def per_row_unfused(x, W, A, B, scales, index, bias):
    """Each row through kernels.lora_matmul with its own adapter (base rows: scale 0)."""
    rows = []
    for m, i in enumerate(index.tolist()):
        a = max(i, 0)
        s = float(scales[i]) if i >= 0 else 0.0
        rows.append(kernels.lora_matmul(x[m:m + 1], W, A[a], B[a], s, bias))
    return torch.cat(rows)


def grad_or_zeros(t):
    """torch leaves .grad as None when no row used the tensor; the reference says zeros."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def check_batched(p, dtype, device, backend_name):
    x, W, A, B, scales, index, bias = build(p, dtype, device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    with backend(backend_name):
        y = kernels.lora_matmul_batched(leaves[0], W, leaves[1], leaves[2], scales, index, bias)
        dY = torch.randn(y.shape, generator=torch.Generator().manual_seed(p["seed"] + 1)).to(device, dtype)
        y.backward(dY)
    lowp_leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    with backend("torch"):
        lowp_y = per_row_unfused(lowp_leaves[0], W, lowp_leaves[1], lowp_leaves[2], scales, index, bias)
        lowp_y.backward(dY)

    args64 = (to64(x), to64(W), to64(A), to64(B), to64(scales), index.cpu().numpy())
    ref_y = reference.lora_batched_forward(*args64, None if bias is None else to64(bias))
    assert y.shape == (p["M"], p["N"]) and y.dtype == dtype
    assert_matches("y", y, ref_y, lowp_y, dtype)
    ref_grads = reference.lora_batched_backward(*args64, to64(dY))
    for name, leaf, ref, lowp_leaf in zip(("dX", "dA", "dB"), leaves, ref_grads, lowp_leaves):
        assert_matches(name, grad_or_zeros(leaf), ref, grad_or_zeros(lowp_leaf), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@settings(max_examples=15)
@given(p=batched_problems())
def test_batched_equals_reference_and_per_row_fused(backend_name, dtype, p):
    note(p)
    check_batched(p, dtype, "cpu", backend_name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=30)
@given(p=batched_problems(max_dim=2048, max_m=600, max_adapters=64))
def test_batched_equals_reference_on_gpu(dtype, p):
    note(p)
    check_batched(p, dtype, "cuda", "triton")


def test_rows_of_one_adapter_equal_the_single_adapter_kernel():
    gen = torch.Generator().manual_seed(3)
    x, W = torch.randn(37, 20, generator=gen), torch.randn(20, 30, generator=gen)
    A, B = torch.randn(3, 20, 4, generator=gen), torch.randn(3, 4, 30, generator=gen)
    with backend("triton"):
        y = kernels.lora_matmul_batched(x, W, A, B, [0.5, -1.0, 2.0], torch.full((37,), 2))
        single = kernels.lora_matmul(x, W, A[2], B[2], 2.0)
    np.testing.assert_allclose(to64(y), to64(single), rtol=1e-5, atol=1e-5)


def _operands(n=2, M=4, K=8, N=6, r=2):
    return torch.randn(M, K), torch.randn(K, N), torch.randn(n, K, r), torch.randn(n, r, N), torch.ones(n), torch.zeros(M, dtype=torch.long)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, W, A, B, s, i: (x, W, A[0], B, s, i), "expected A_stack"),
        (lambda x, W, A, B, s, i: (x, W, A, B[:1], s, i), "need the same number"),
        (lambda x, W, A, B, s, i: (x, W, A, B, s[:1], i), "scales has shape"),
        (lambda x, W, A, B, s, i: (x, W, A, B, s, i[:3]), "one entry per row"),
        (lambda x, W, A, B, s, i: (x, W, A, B, s, i.float()), "int32/int64"),
        (lambda x, W, A, B, s, i: (x, W, A, B, s, i + 2), r"\[-1, 1\]"),
        (lambda x, W, A, B, s, i: (x, W, A, B, s, i - 2), r"\[-1, 1\]"),
        (lambda x, W, A, B, s, i: (x, W, A[:, :5], B, s, i), "K mismatch"),
    ],
)
def test_bad_batched_operands_raise(mutate, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.lora_matmul_batched(*mutate(*_operands()))
