"""kernels.lora_matmul on the configurations people train with: LoRA dropout inside the fused call, fp32
adapters on 16-bit x and W, and torch.autocast; on the torch path and the Triton kernels (interpreted).

The mask is never stored, so the tests recover it the way a user could: with identity adapters (W = 0,
A = B = I, s = 1) the output is D = keep * x / (1 - p) itself, and the mask depends only on the seed
and each element's coordinates, so the same (M, K, seed) gives the mask of any other call.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank import kernels
from lowrank.kernels import reference

from .kernel_checks import LAYOUTS, assert_matches, backend, keep_of, make, to64

BACKENDS = ["torch", "triton"]
# (dtype of x and W, dtype of A and B)
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_a_fraction_p_and_scales_the_kept_entries(backend_name, p):
    M, K = 96, 80  # 7680 entries: the dropped fraction is p within 5 standard deviations
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(K)
    with backend(backend_name):
        d = kernels.lora_matmul(x, torch.zeros(K, K), eye, eye, 1.0, dropout_p=p, seed=3)
    dropped = (d == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / (M * K)) ** 0.5, dropped
    kept = d != 0
    torch.testing.assert_close(d[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_the_seed_fixes_the_mask_and_torch_manual_seed_reproduces_it(backend_name):
    first, again, other = (keep_of(40, 24, 0.3, seed, backend_name) for seed in (5, 5, 6))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    x, eye = torch.randn(40, 24), torch.eye(24)
    with backend(backend_name):
        drawn = []
        for _ in range(2):
            torch.manual_seed(11)
            drawn.append(kernels.lora_matmul(x, torch.zeros(24, 24), eye, eye, 1.0, dropout_p=0.3))
        unseeded = kernels.lora_matmul(x, torch.zeros(24, 24), eye, eye, 1.0, dropout_p=0.3)
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], unseeded)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_no_dropout_means_no_mask(backend_name):
    x, eye = torch.randn(7, 9), torch.eye(9)
    with backend(backend_name):
        assert torch.equal(kernels.lora_matmul(x, torch.zeros(9, 9), eye, eye, 1.0, dropout_p=0.0, seed=1), x)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_the_backward_uses_the_forwards_mask(backend_name):
    """Identity adapters: y = D, so dX = keep * dY and dA = D.T @ dY, with the forward's keep."""
    M, K = 33, 20
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=gen).requires_grad_()
    A, B = torch.eye(K).requires_grad_(), torch.eye(K).requires_grad_()
    dY = torch.randn(M, K, generator=gen)
    with backend(backend_name):
        y = kernels.lora_matmul(x, torch.zeros(K, K), A, B, 1.0, dropout_p=0.4, seed=8)
        y.backward(dY)
    keep = keep_of(M, K, 0.4, 8, backend_name)
    np.testing.assert_allclose(to64(y), keep * to64(x), rtol=1e-6)
    np.testing.assert_allclose(to64(x.grad), keep * to64(dY), rtol=1e-6)
    np.testing.assert_allclose(to64(A.grad), (keep * to64(x)).T @ to64(dY), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_with_a_fixed_seed_the_gradient_is_the_derivative(backend_name):
    """<u, y(x + v) - y(x)> = <dL/dx, v> for L = <u, y>: with the mask fixed y is linear in x."""
    gen = torch.Generator().manual_seed(4)
    M, K, N, r = 17, 30, 22, 5
    x, v, u = torch.randn(M, K, generator=gen), torch.randn(M, K, generator=gen), torch.randn(M, N, generator=gen)
    W, A, B = torch.randn(K, N, generator=gen), torch.randn(K, r, generator=gen), torch.randn(r, N, generator=gen)
    with backend(backend_name):
        f = lambda t: kernels.lora_matmul(t, W, A, B, 1.5, dropout_p=0.5, seed=21)
        leaf = x.clone().requires_grad_()
        (f(leaf) * u).sum().backward()
        change = ((f(x + v) - f(x)) * u).double().sum().item()
    derivative = (leaf.grad.double() * v.double()).sum().item()
    assert change == pytest.approx(derivative, rel=1e-4)


@st.composite
def problems(draw):
    return dict(
        M=draw(st.one_of(st.just(1), st.integers(1, 90))), K=draw(st.integers(1, 70)), N=draw(st.integers(1, 70)),
        r=draw(st.one_of(st.integers(1, 17), st.just(65))),
        x_layout=draw(st.sampled_from(LAYOUTS)), w_layout=draw(st.sampled_from(LAYOUTS)),
        a_layout=draw(st.sampled_from(LAYOUTS)), b_layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([-1.5, 0.25, 2.0])), bias=draw(st.booleans()),
        p=draw(st.sampled_from([0.0, 0.1, 0.5])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def unfused(x, W, A, B, s, bias, keep):
    """PEFT's way in the working dtypes: the base in x's dtype, the low-rank path in A's, summed in A's."""
    d = x.to(A.dtype) if keep is None else x.to(A.dtype) * keep.to(A.dtype)
    y = (x @ W if bias is None else x @ W + bias).to(A.dtype) + s * ((d @ A) @ B)
    return y.to(x.dtype)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("backend_name", BACKENDS)
@given(p=problems())
def test_dropout_and_mixed_dtypes_equal_the_float64_reference(backend_name, dtypes, p):
    note(p)
    dtype, lora_dtype = dtypes
    if backend_name == "torch" and dtype != torch.float32:
        p = dict(p, M=min(p["M"], 24))  # CPU half-precision matmuls are slow
    gen = torch.Generator().manual_seed(p["seed"])
    M, K, N, r, s = p["M"], p["K"], p["N"], p["r"], p["scale"]
    x = make((M, K), p["x_layout"], dtype, gen, "cpu")
    W = make((K, N), p["w_layout"], dtype, gen, "cpu") / K ** 0.5
    A = make((K, r), p["a_layout"], lora_dtype, gen, "cpu") / K ** 0.5
    B = make((r, N), p["b_layout"], lora_dtype, gen, "cpu") / r ** 0.5
    bias = torch.randn(N, generator=gen).to(dtype) if p["bias"] else None
    dY = torch.randn(M, N, generator=gen).to(dtype)
    keep = keep_of(M, K, p["p"], p["seed"], backend_name) if p["p"] else None

    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    with backend(backend_name):
        y = kernels.lora_matmul(leaves[0], W, leaves[1], leaves[2], s, bias, dropout_p=p["p"], seed=p["seed"])
        y.backward(dY)
    assert y.dtype == dtype and leaves[0].grad.dtype == dtype
    assert leaves[1].grad.dtype == leaves[2].grad.dtype == lora_dtype

    lowp_leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    keep_t = None if keep is None else torch.from_numpy(keep)
    lowp_y = unfused(lowp_leaves[0], W, lowp_leaves[1], lowp_leaves[2], s, bias, keep_t)
    lowp_y.backward(dY)
    bias64 = None if bias is None else to64(bias)
    ref_y = reference.lora_forward(to64(x), to64(W), to64(A), to64(B), s, bias64, keep)
    assert_matches("y", y, ref_y, lowp_y, dtype)
    ref_grads = reference.lora_backward(to64(x), to64(W), to64(A), to64(B), s, to64(dY), keep)
    for name, got, ref, lowp in zip(("dX", "dA", "dB"), (t.grad for t in leaves), ref_grads,
                                    (t.grad for t in lowp_leaves)):
        assert_matches(name, got, ref, lowp, dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_autocast_runs_x_and_w_in_the_autocast_dtype_and_keeps_fp32_adapters(backend_name):
    gen = torch.Generator().manual_seed(6)
    M, K, N, r = 12, 40, 24, 4
    x, W = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen) / K ** 0.5
    A = (torch.randn(K, r, generator=gen) / K ** 0.5).requires_grad_()
    B = (torch.randn(r, N, generator=gen) / r ** 0.5).requires_grad_()
    bias, dY = torch.randn(N, generator=gen), torch.randn(M, N, generator=gen)
    with backend(backend_name), torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.lora_matmul(x, W, A, B, 2.0, bias)
    assert y.dtype == torch.bfloat16
    y.float().backward(dY)
    assert A.grad.dtype == B.grad.dtype == torch.float32
    # The reference: x, W and bias rounded to bf16 as autocast rounds them, A and B as they are.
    x16, W16, bias16 = (to64(t.bfloat16()) for t in (x, W, bias))
    ref_y = reference.lora_forward(x16, W16, to64(A), to64(B), 2.0, bias16)
    lowp = (x.bfloat16() @ W.bfloat16() + bias.bfloat16()).float() + 2.0 * (x.bfloat16().float() @ A @ B)
    assert_matches("y", y, ref_y, lowp.bfloat16(), torch.bfloat16)
    _, ref_dA, ref_dB, _ = reference.lora_backward(x16, W16, to64(A), to64(B), 2.0, to64(dY.bfloat16()))
    np.testing.assert_allclose(to64(A.grad), ref_dA, rtol=2e-2, atol=2e-2 * np.abs(ref_dA).max())
    np.testing.assert_allclose(to64(B.grad), ref_dB, rtol=2e-2, atol=2e-2 * np.abs(ref_dB).max())


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_a_dropout_probability_outside_0_1_is_refused(p):
    x, eye = torch.randn(2, 3), torch.eye(3)
    with pytest.raises(ValueError, match=rf"dropout_p={p} must be in \[0, 1\)"):
        kernels.lora_matmul(x, eye, eye, eye, 1.0, dropout_p=p)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_the_custom_ops_autocast_rule_casts_x_w_and_bias_only(backend_name):
    """Called directly (as torch.compile's graph calls it), the op itself follows the same rule."""
    from lowrank.kernels.autograd import lora_matmul_op

    gen = torch.Generator().manual_seed(9)
    x, W, A, B, bias = (torch.randn(*s, generator=gen) for s in ((5, 16), (16, 12), (16, 3), (3, 12), (12,)))
    with backend(backend_name), torch.autocast("cpu", dtype=torch.bfloat16):
        y, xa = lora_matmul_op(x, W, A, B, 0.5, bias, 0.0, None)
    assert y.dtype == torch.bfloat16 and xa.dtype == torch.float32
    x16, W16, b16 = (to64(t.bfloat16()) for t in (x, W, bias))
    np.testing.assert_allclose(to64(xa), x16 @ to64(A), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to64(y), reference.lora_forward(x16, W16, to64(A), to64(B), 0.5, b16), rtol=1e-2, atol=2e-2)
