"""What the public kernel entries (kernels.lora_matmul, kernels.lora_matmul_batched, kernels.use_triton) do
with inputs they cannot take: an error that names the argument at fault, raised before any work; and
the zero-size inputs they can take, K = 0 included, on both backends."""
import math

import pytest
import torch

from lowrank import kernels

from .kernel_checks import backend

BACKENDS = ["torch", "triton"]


def operands(M=4, K=8, N=6, r=2):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen), torch.randn(K, r, generator=gen),
            torch.randn(r, N, generator=gen))


def batched_operands(n=2, M=4, K=8, N=6, r=2):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen), torch.randn(n, K, r, generator=gen),
            torch.randn(n, r, N, generator=gen), torch.ones(n), torch.zeros(M, dtype=torch.long))


@pytest.fixture
def no_work(monkeypatch):
    """Every path that computes or casts fails the test if reached: errors must come first."""
    def reached(*_, **__):
        raise AssertionError("work started before the inputs were checked")
    for name in ("lora_fwd_torch", "lora_batched_fwd_torch", "lora_matmul_op", "lora_matmul_batched_op",
                 "autocast_operands"):
        monkeypatch.setattr(kernels, name, reached)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_a_scale_that_is_not_finite_is_refused(scale, backend_name, no_work):
    with backend(backend_name), pytest.raises(ValueError, match=r"scale=.* must be finite"):
        kernels.lora_matmul(*operands(), scale)


@pytest.mark.parametrize("scale", [None, "2.0", [1.0], torch.tensor(1.0), True, 1j])
def test_a_scale_that_is_not_a_real_number_is_refused(scale, no_work):
    with pytest.raises(TypeError, match=rf"scale must be a real number, got {type(scale).__name__}"):
        kernels.lora_matmul(*operands(), scale)


def test_a_bad_scale_is_refused_under_autocast_before_the_operands_are_cast(no_work):
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="scale"):
        kernels.lora_matmul(*operands(), math.nan)


@pytest.mark.parametrize("scale", [2, 0.5, -1.5, 0.0])
def test_real_scales_of_any_python_type_are_taken(scale):
    x, W, A, B = operands()
    torch.testing.assert_close(kernels.lora_matmul(x, W, A, B, scale), x @ W + float(scale) * (x @ A) @ B)


@pytest.mark.parametrize("position, name", [(0, "x"), (1, "W"), (2, "A"), (3, "B")])
def test_an_operand_that_is_not_a_tensor_is_named(position, name, no_work):
    args = list(operands())
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=rf"\b{name} must be a (floating-point )?tensor, got list"):
        kernels.lora_matmul(*args, 1.0)


@pytest.mark.parametrize("position, name", [(0, "x"), (1, "W"), (2, "A_stack"), (3, "B_stack"), (5, "adapter_index")])
def test_a_batched_operand_that_is_not_a_tensor_is_named(position, name, no_work):
    args = list(batched_operands())
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=rf"lora_matmul_batched: {name} must be a tensor, got list"):
        kernels.lora_matmul_batched(*args)


@pytest.mark.parametrize("scales", [None, "1.0", [None, 1.0], [[1.0], [2.0, 3.0]]])
def test_batched_scales_that_are_not_numbers_are_refused(scales, no_work):
    x, W, A, B, _, index = batched_operands()
    with pytest.raises(TypeError, match="scales must be a tensor or a sequence of numbers"):
        kernels.lora_matmul_batched(x, W, A, B, scales, index)


@pytest.mark.parametrize("scales", [[1.0, math.nan], torch.tensor([math.inf, 1.0]), [-math.inf, 0.0]])
def test_batched_scales_that_are_not_finite_are_refused(scales, no_work):
    x, W, A, B, _, index = batched_operands()
    with pytest.raises(ValueError, match="scales must be finite"):
        kernels.lora_matmul_batched(x, W, A, B, scales, index)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda x, W, A, B, s, i: (x, W.half(), A, B, s, i), TypeError, "W has dtype torch.float16"),
        (lambda x, W, A, B, s, i: (x, W, A.double(), B.double(), s, i), TypeError, "A and B have dtypes"),
        (lambda x, W, A, B, s, i: (x, W.to("meta"), A, B, s, i), ValueError, "W is on meta"),
        (lambda x, W, A, B, s, i: (x, W, A, B[:, :, :5], s, i), ValueError, "B has shape"),
        (lambda x, W, A, B, s, i: (x.long(), W, A, B, s, i), TypeError, "x must be a floating-point tensor"),
    ],
)
def test_batched_shapes_dtypes_and_devices_are_named(mutate, error, message, no_work):
    with pytest.raises(error, match=message):
        kernels.lora_matmul_batched(*mutate(*batched_operands()))


def test_use_triton_names_a_non_tensor():
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        kernels.use_triton([1.0])


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("leading, K", [((4,), 0), ((2, 3), 0), ((0,), 0), ((0,), 5), ((2, 0), 5)])
def test_zero_size_inputs_give_the_bias_or_nothing(leading, K, backend_name):
    """K = 0: y is the bias on every row and the adapters' gradients are zero; no rows: y is empty. Both
    entries; the single one also backward."""
    x = torch.randn(*leading, K, requires_grad=True)
    W, bias = torch.randn(K, 6), torch.randn(6)
    A, B = torch.randn(K, 2, requires_grad=True), torch.randn(2, 6, requires_grad=True)
    index = torch.zeros(leading, dtype=torch.long)
    with backend(backend_name):
        y = kernels.lora_matmul(x, W, A, B, 2.0, bias)
        y.sum().backward()
        y_batched = kernels.lora_matmul_batched(x.detach(), W, A.detach()[None], B.detach()[None], [2.0], index, bias)
    expected = bias.expand(*leading, 6)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y_batched, expected)
    assert x.grad.shape == x.shape and A.grad.shape == A.shape and not B.grad.any()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(A=None), TypeError, "A must be a tensor"), (dict(dropout_p="0.5"), TypeError, "dropout_p must be a real"),
    (dict(dropout_p=0.5, seed="abc"), ValueError, "seed='abc'"), (dict(dropout_p=0.5, seed=2 ** 70), ValueError, "seed="),
])
def test_missing_factors_and_bad_dropout_arguments_are_named(kwargs, error, match):
    x, W, A, B = torch.randn(3, 4), torch.randn(4, 5), torch.randn(4, 2), torch.randn(2, 5)
    args = {"x": x, "W": W, "A": A, "B": B, "scale": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        kernels.lora_matmul(**args)
