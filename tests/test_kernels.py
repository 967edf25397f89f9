"""Properties of kernels.lora_matmul: equal to the float64 reference, to the merged
dense weight and to torch's unfused expression, forward and backward, for every
backend, dtype, layout, rank, scale and bias setting hypothesis draws.

Tolerance rule (flash-attention's): the kernel's error against float64 is at
most twice the error of torch's own unfused expression in the same dtype,
plus an absolute slack of TOLERANCE[dtype] times the output's magnitude.
On a CPU the "triton" backend runs the kernels through TRITON_INTERPRET=1.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from lowrank import kernels
from lowrank.kernels import reference
from lowrank.kernels.autograd import lora_matmul_op

from .kernel_checks import DTYPES, LAYOUTS, assert_matches, backend, make, to64


@st.composite
def problems(draw, max_dim=80, max_m=100):
    M = draw(st.one_of(st.just(1), st.integers(1, max_m)))
    K = draw(st.integers(1, max_dim))
    N = draw(st.integers(1, max_dim))
    r = draw(st.one_of(st.integers(1, 20), st.sampled_from([65, 96])))
    return dict(
        M=M, K=K, N=N, r=r,
        x_layout=draw(st.sampled_from(LAYOUTS)),
        w_layout=draw(st.sampled_from(LAYOUTS)),
        a_layout=draw(st.sampled_from(LAYOUTS)),
        b_layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([0.0, -1.5, 0.25, 2.0, 16.0])),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(p, dtype, device):
    gen = torch.Generator().manual_seed(p["seed"])
    x = make((p["M"], p["K"]), p["x_layout"], dtype, gen, device)
    W = make((p["K"], p["N"]), p["w_layout"], dtype, gen, device) / p["K"] ** 0.5
    A = make((p["K"], p["r"]), p["a_layout"], dtype, gen, device) / p["K"] ** 0.5
    B = make((p["r"], p["N"]), p["b_layout"], dtype, gen, device) / p["r"] ** 0.5
    bias = torch.randn(p["N"], generator=gen).to(device=device, dtype=dtype) if p["bias"] else None
    return x, W, A, B, bias


def unfused(x, W, A, B, s, bias):
    """PEFT's way: separate torch ops in the working dtype."""
    y = x @ W + s * ((x @ A) @ B)
    return y if bias is None else y + bias


def check_forward_and_backward(p, dtype, device, backend_name):
    note(p)
    x, W, A, B, bias = build(p, dtype, device)
    s = p["scale"]
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    bias_leaf = bias.detach().clone().requires_grad_() if bias is not None else None
    with backend(backend_name):
        y = kernels.lora_matmul(leaves[0], W, leaves[1], leaves[2], s, bias_leaf)
        dY = torch.randn(y.shape, generator=torch.Generator().manual_seed(p["seed"] + 1)).to(device, dtype)
        y.backward(dY)

    ref_y = reference.lora_forward(to64(x), to64(W), to64(A), to64(B), s, None if bias is None else to64(bias))
    lowp_leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    lowp_bias = bias.detach().clone().requires_grad_() if bias is not None else None
    lowp_y = unfused(lowp_leaves[0], W, lowp_leaves[1], lowp_leaves[2], s, lowp_bias)
    lowp_y.backward(dY)
    assert y.dtype == dtype and y.shape == (p["M"], p["N"])
    assert_matches("y", y, ref_y, lowp_y, dtype)

    merged = torch.from_numpy(reference.merged_weight(to64(W), to64(A), to64(B), s)).to(device, dtype)
    lowp_merged = x @ merged + (0 if bias is None else bias)
    assert_matches("y vs merged weight", y, ref_y, lowp_merged, dtype)

    ref_grads = reference.lora_backward(to64(x), to64(W), to64(A), to64(B), s, to64(dY))
    for name, got, ref, lowp in zip(("dX", "dA", "dB"), (t.grad for t in leaves), ref_grads, (t.grad for t in lowp_leaves)):
        assert_matches(name, got, ref, lowp, dtype)
    if bias is not None:
        assert_matches("dbias", bias_leaf.grad, ref_grads[3], lowp_bias.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@given(p=problems())
def test_fused_equals_reference_merged_and_unfused(backend_name, dtype, p):
    if backend_name == "torch" and dtype != torch.float32:
        # CPU half-precision matmuls are slow and exact-ish; fp32 fixes the torch path's semantics.
        p = dict(p, M=min(p["M"], 24))
    check_forward_and_backward(p, dtype, "cpu", backend_name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=60)
@given(p=problems(max_dim=3000, max_m=5000))
def test_fused_equals_reference_on_gpu(dtype, p):
    check_forward_and_backward(p, dtype, "cuda", "triton")


@pytest.mark.parametrize("M", [1, 33, 100])
def test_leading_dimensions_are_flattened(M):
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(2, M, 3, 24, generator=gen)
    W, A, B = torch.randn(24, 40, generator=gen), torch.randn(24, 4, generator=gen), torch.randn(4, 40, generator=gen)
    with backend("triton"):
        y = kernels.lora_matmul(x, W, A, B, 0.5)
    assert y.shape == (2, M, 3, 40)
    expected = reference.lora_forward(to64(x.reshape(-1, 24)), to64(W), to64(A), to64(B), 0.5).reshape(2, M, 3, 40)
    np.testing.assert_allclose(to64(y), expected, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_gradient_only_when_it_asks():
    gen = torch.Generator().manual_seed(0)
    x, A, B = torch.randn(5, 8, generator=gen), torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen)
    W = torch.randn(8, 6, generator=gen, requires_grad=True)
    dY = torch.randn(5, 6, generator=gen)
    kernels.lora_matmul(x, W, A, B, 2.0).backward(dY)
    np.testing.assert_allclose(to64(W.grad), to64(x).T @ to64(dY), rtol=1e-5, atol=1e-5)


def test_custom_op_registration_passes_opcheck():
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(7, 12, generator=gen, requires_grad=True), torch.randn(12, 9, generator=gen),
            torch.randn(12, 3, generator=gen, requires_grad=True), torch.randn(3, 9, generator=gen, requires_grad=True),
            0.5, torch.randn(9, generator=gen, requires_grad=True), 0.0, None)
    seed = lambda value: torch.tensor([value])  # the dropout seed, a one-element int64 tensor
    torch.library.opcheck(lora_matmul_op, args)
    torch.library.opcheck(lora_matmul_op, args[:6] + (0.25, seed(1234)))  # LoRA dropout
    mixed = (args[0].detach().bfloat16().requires_grad_(), args[1].bfloat16(), *args[2:4], 0.5,
             args[5].detach().bfloat16().requires_grad_(), 0.25, seed(7))  # fp32 adapters on bf16
    torch.library.opcheck(lora_matmul_op, mixed)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_torch_compile_traces_without_graph_break(backend_name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=gen)
    W, A, B = torch.randn(16, 10, generator=gen), torch.randn(16, 2, generator=gen), torch.randn(2, 10, generator=gen)

    def f(x):
        return torch.relu(kernels.lora_matmul(x, W, A, B, 2.0)).sum(-1)

    with backend(backend_name):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), f(x))


def _operands(K=8, N=6, r=2, dtype=torch.float32):
    return torch.randn(4, K, dtype=dtype), torch.randn(K, N, dtype=dtype), torch.randn(K, r, dtype=dtype), torch.randn(r, N, dtype=dtype)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, W, A, B: (x[:, :5], W, A, B), "K mismatch"),
        (lambda x, W, A, B: (x, W, A[:5], B), "K mismatch"),
        (lambda x, W, A, B: (x, W, A, B[:, :4]), "B has shape"),
        (lambda x, W, A, B: (x, W, A, B[:1]), "B has shape"),
        (lambda x, W, A, B: (x, W, A[:, :0], B[:0]), "rank must be at least 1"),
        (lambda x, W, A, B: (x.long(), W, A, B), "x must be a floating-point tensor, got torch.int64"),
        (lambda x, W, A, B: (x.tolist(), W, A, B), "x must be a floating-point tensor, got list"),
        (lambda x, W, A, B: (x, W, A.double(), B.double()), "A and B have dtypes torch.float64"),
        (lambda x, W, A, B: (x, W, A.half(), B), "A and B have dtypes torch.float16 and torch.float32"),
        (lambda x, W, A, B: (x, W.half(), A, B), "cast them to one dtype"),
        (lambda x, W, A, B: (x, W.to("meta"), A, B), "is on meta"),
        (lambda x, W, A, B: (x, W, A.to("meta"), B), "A is on meta"),
        (lambda x, W, A, B: (x[0, 0], W, A, B), "expected x"),
        (lambda x, W, A, B: (x, W[0], A, B), "expected x"),
    ],
)
def test_bad_operands_raise_before_launch(mutate, message):
    operands = mutate(*_operands())
    assert not kernels._well_formed(*operands, None)  # the fast path lets nothing through that _check refuses
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.lora_matmul(*operands, 1.0)


@pytest.mark.parametrize("mutate", [
    lambda x, W, A, B: (x, W, A, B),
    lambda x, W, A, B: (x[None], W.T.contiguous().T, A, B),
    lambda x, W, A, B: (x.bfloat16(), W.bfloat16(), A, B),  # fp32 adapters on bf16
    lambda x, W, A, B: (x.half(), W.half(), A.half(), B.half()),
])
def test_good_operands_take_the_fast_path(mutate):
    assert kernels._well_formed(*mutate(*_operands()), None)


def test_bad_bias_shape_raises():
    x, W, A, B = _operands()
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(6,\)"):
        kernels.lora_matmul(x, W, A, B, 1.0, torch.randn(5))


def test_forcing_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("LOWRANK_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.use_triton(torch.zeros(1))


def test_cpu_dispatch_uses_torch_unless_forced(monkeypatch):
    monkeypatch.delenv("LOWRANK_FORCE_TRITON", raising=False)
    assert not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("LOWRANK_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(torch.zeros(1))
