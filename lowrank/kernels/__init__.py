"""Fused LoRA matmul kernels: `y = x @ W + s * (x @ A) @ B + bias`.

`lora_matmul` is the public entry; `lora_matmul_batched` is the mixed-adapter
form, one adapter per row (kernels/batched.py). CUDA tensors run the Triton kernels
(kernels/lora_triton.py); other devices run the same semantics in torch
(kernels/torch_path.py). NumPy float64 references live in kernels/reference.py.
"""
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .autograd import autocast_operands, lora_matmul_batched_op, lora_matmul_op, use_triton
from .torch_path import lora_batched_fwd_torch, lora_fwd_torch

__all__ = ["lora_matmul", "lora_matmul_batched", "use_triton"]


def _well_formed(x, w, a, b, bias) -> bool:
    """Everything _check demands, as one expression: decode calls this for every layer and token, and
    only operands that fail it pay for _check's messages."""
    try:
        dtype, xs, ws, As, bs = x.dtype, x.shape, w.shape, a.shape, b.shape
        return (x.is_floating_point() and w.dtype == dtype and a.dtype == b.dtype
                and (a.dtype == dtype or (a.dtype == torch.float32 and x.element_size() == 2))
                and ((x.is_cpu and w.is_cpu and a.is_cpu and b.is_cpu and (bias is None or bias.is_cpu))
                     or w.device == a.device == b.device == x.device == (x.device if bias is None else bias.device))
                and len(xs) >= 1 and len(ws) == 2 and len(As) == 2 and len(bs) == 2
                and xs[-1] == ws[0] == As[0] and As[1] >= 1 and bs[0] == As[1] and bs[1] == ws[1]
                and (bias is None or (bias.dtype == dtype and bias.shape == ws[1:])))
    except AttributeError:  # an operand that is not a tensor
        return False


def _check(x: Tensor, w: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor]) -> None:
    """ValueError/TypeError naming the operand at fault (for operands that fail _well_formed)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"lora_matmul: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    for name, t in (("W", w), ("A", a), ("B", b), ("bias", bias)):
        if not isinstance(t, Tensor) and (t is not None or name != "bias"):
            raise TypeError(f"lora_matmul: {name} must be a tensor, got {type(t).__name__}")
        if t is not None and t.device != x.device:
            raise ValueError(f"lora_matmul: {name} is on {t.device} but x is on {x.device}")
    if w.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        bad = "W" if w.dtype != x.dtype else "bias"
        raise TypeError(f"lora_matmul: {bad} has dtype {(w if bad == 'W' else bias).dtype} but x has {x.dtype}; "
                        f"cast them to one dtype")
    if a.dtype != b.dtype or (a.dtype != x.dtype and not (a.dtype == torch.float32 and x.element_size() == 2)):
        raise TypeError(f"lora_matmul: A and B have dtypes {a.dtype} and {b.dtype} with x {x.dtype}; they must "
                        f"share x's dtype, or be float32 with a 16-bit x (fp32 adapters on a half-precision model)")
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


def _check_scale(scale) -> float:
    """scale as a float: TypeError unless a real number (not a bool, not a tensor), ValueError unless finite
    (a NaN or inf scale would turn every output into NaN or inf without a word)."""
    if isinstance(scale, bool) or not isinstance(scale, (float, int, numbers.Real)):
        raise TypeError(f"lora_matmul: scale must be a real number, got {type(scale).__name__}")
    if not -math.inf < scale < math.inf:  # not math.isfinite: torch.compile cannot trace it on a float argument
        raise ValueError(f"lora_matmul: scale={scale!r} must be finite")
    return float(scale)


def _check_dropout(dropout_p, seed) -> float:
    """dropout_p as a float (TypeError unless a real number, ValueError unless 0 <= dropout_p < 1); seed None,
    an integer in [0, 2**63) or a one-element int64 tensor."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"lora_matmul: dropout_p must be a real number, got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_matmul: dropout_p={dropout_p!r} must be in [0, 1)")
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"lora_matmul: a seed tensor must hold one int64, got {seed.dtype} {tuple(seed.shape)}")
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ValueError(f"lora_matmul: seed={seed!r} must be None, an integer in [0, 2**63) or an int64 tensor")
    return p


def _device_seed(seed, p: float, device) -> Optional[Tensor]:
    """The seed as the Triton kernels read it: None without dropout, else a (1,) int64 tensor on `device`;
    seed None draws it there from torch's generator (torch.manual_seed reproduces a run, and a compiled graph
    or CUDA graph draws a new one each call, with no host sync)."""
    if not p:
        return None
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    if isinstance(seed, Tensor):
        return seed.reshape(1).to(device)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def lora_matmul(x: Tensor, W: Tensor, A: Tensor, B: Tensor, scale: float, bias: Optional[Tensor] = None,
                dropout_p: float = 0.0, seed: Optional[int] = None) -> Tensor:
    """y = x @ W + scale * (dropout(x) @ A) @ B + bias, in one fused call.

    x: (..., K); W: (K, N), any strides (an nn.Linear weight's `.T`, a Conv1D
    weight); A: (K, r) and B: (r, N), any strides (PEFT's `lora_A.weight.T`,
    `lora_B.weight.T`); bias: (N,) or None. x, W and bias share a floating dtype;
    A and B share it too, or are fp32 with a 16-bit x (PEFT's fp32 adapters on a
    bf16/fp16 model: the LoRA term is computed in fp32 and added before the one
    rounding). fp16 and bf16 accumulate in fp32. Returns (..., N) in x's dtype.
    Differentiable in x, A, B, bias (and W, if it requires grad); A's and B's
    gradients come in their dtype.

    dropout_p: LoRA dropout (training): the low-rank path sees keep * x / (1 - p),
    the base path x itself. On the Triton path the mask is a function of the seed
    and each element's coordinates, regenerated in the backward and never stored;
    the torch path draws it from a generator seeded with `seed`. seed (an int or a
    one-element int64 tensor) None takes the randomness from torch's generator, so
    torch.manual_seed reproduces a run (the two paths' masks differ); the Triton
    path then draws its seed on x's device, inside a compiled graph.
    Under torch.autocast, x, W and bias take the autocast dtype; A and B keep theirs.
    """
    scale = _check_scale(scale)
    if isinstance(x, Tensor) and torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type):
        # Before the checks: under autocast x, W and bias may arrive in different dtypes.
        x, W, bias = autocast_operands(x, W, bias, x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _lora_matmul(x, W, A, B, scale, bias, dropout_p, seed)
    return _lora_matmul(x, W, A, B, scale, bias, dropout_p, seed)


def _lora_matmul(x, W, A, B, scale, bias, dropout_p, seed) -> Tensor:
    if not _well_formed(x, W, A, B, bias):
        _check(x, W, A, B, bias)
    p = _check_dropout(dropout_p, seed) if dropout_p is not None else 0.0
    x2 = x if x.dim() == 2 else x.reshape(_rows(x), x.shape[-1])
    if use_triton(x):
        y, _ = lora_matmul_op(x2, W, A, B, scale, bias, p, _device_seed(seed, p, x.device))
    else:
        # Plain torch ops: autograd and torch.compile see through them, and eager
        # calls skip the custom op's dispatch cost (about 0.1 ms, a decode step's worth).
        y, _ = lora_fwd_torch(x2, W, A, B, scale, bias, p, seed)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], W.shape[1])


def _rows(x: Tensor) -> int:
    """The rows of x (..., K) seen as a matrix (reshape(-1, K) cannot tell them when K = 0)."""
    return math.prod(x.shape[:-1])


def _check_scales(scales, n: int, device) -> Tensor:
    """scales as an (n,) fp32 tensor on `device`: TypeError unless a tensor or a sequence of real numbers,
    ValueError unless n of them, all finite."""
    if isinstance(scales, (str, bytes)) or scales is None:
        raise TypeError(f"lora_matmul_batched: scales must be a tensor or a sequence of numbers, got "
                        f"{type(scales).__name__}")
    try:
        scales = torch.as_tensor(scales, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"lora_matmul_batched: scales must be a tensor or a sequence of numbers: {e}") from None
    if scales.shape != (n,):
        raise ValueError(f"lora_matmul_batched: scales has shape {tuple(scales.shape)}, expected ({n},)")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(scales).all()):
        raise ValueError(f"lora_matmul_batched: scales must be finite; got {scales.tolist()}")
    return scales


def _check_batched(x, w, a_stack, b_stack, scales, adapter_index, bias) -> Tensor:
    """The checked scales (see _check_scales); ValueError/TypeError naming the operand at fault. The checks
    of values (finite scales, indices in range) run in eager calls only: under torch.compile they would
    break the graph."""
    for name, t in (("x", x), ("W", w), ("A_stack", a_stack), ("B_stack", b_stack), ("adapter_index", adapter_index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"lora_matmul_batched: {name} must be a tensor, got {type(t).__name__}")
    if a_stack.dim() != 3 or b_stack.dim() != 3:
        raise ValueError(f"lora_matmul_batched: expected A_stack (n, K, r) and B_stack (n, r, N); got "
                         f"{tuple(a_stack.shape)} and {tuple(b_stack.shape)}")
    n = a_stack.shape[0]
    if n < 1 or b_stack.shape[0] != n:
        raise ValueError(f"lora_matmul_batched: A_stack holds {n} adapters and B_stack {b_stack.shape[0]}; "
                         "need the same number, at least 1")
    _check(x, w, a_stack[0], b_stack[0], bias)
    scales = _check_scales(scales, n, x.device)
    if adapter_index.dtype not in (torch.int32, torch.int64) or adapter_index.numel() != _rows(x):
        raise ValueError(f"lora_matmul_batched: adapter_index must be int32/int64 with one entry per row of x "
                         f"({_rows(x)}); got {adapter_index.dtype} {tuple(adapter_index.shape)}")
    if (adapter_index.numel() and not torch.compiler.is_compiling()
            and (int(adapter_index.min()) < -1 or int(adapter_index.max()) >= n)):
        raise ValueError(f"lora_matmul_batched: adapter_index values must lie in [-1, {n - 1}]; got "
                         f"[{int(adapter_index.min())}, {int(adapter_index.max())}]")
    return scales


def lora_matmul_batched(x: Tensor, W: Tensor, A_stack: Tensor, B_stack: Tensor, scales, adapter_index: Tensor,
                        bias: Optional[Tensor] = None) -> Tensor:
    """Mixed-adapter LoRA: y[m] = x[m] @ W + s[i] * (x[m] @ A_stack[i]) @ B_stack[i] + bias, i = adapter_index[m].

    x: (..., K); W: (K, N); A_stack: (n, K, r); B_stack: (n, r, N), any strides
    (adapters of lower rank zero-padded to r); scales: (n,) tensor or sequence
    of floats; adapter_index: (...) integer, one per row of x, -1 = base only.
    One launch per call on CUDA whatever the mix of adapters. Returns (..., N).
    Differentiable in x, A_stack, B_stack, bias.
    """
    scales = _check_batched(x, W, A_stack, B_stack, scales, adapter_index, bias)
    x2, index = x.reshape(_rows(x), x.shape[-1]), adapter_index.reshape(-1).to(x.device)
    if use_triton(x):
        order = torch.argsort(index, stable=True)
        y, _ = lora_matmul_batched_op(x2, W, A_stack, B_stack, scales, order, index[order].to(torch.int32), bias)
    else:
        y = lora_batched_fwd_torch(x2, W, A_stack, B_stack, scales, index, bias)
    return y.reshape(*x.shape[:-1], W.shape[1])
