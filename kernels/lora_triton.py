"""Triton kernels for the fused LoRA matmul and their launcher.

    y = x @ W + s * (x @ A) @ B + bias        x (M, K), W (K, N), A (K, r), B (r, N)

Two launches for prefill-sized M:

1. `_shrink_kernel` writes xa = x @ A, (M, r): small, and the backward reuses it.
2. `_lora_fwd_kernel` computes one (BLOCK_M, BLOCK_N) tile of y per program: the
   accumulator starts as s * xa_tile @ B_tile (one fp32 tile in registers, not
   two), the K loop adds x @ W, the epilogue the bias, and y is written once.
   Neither x @ W nor the unscaled (x @ A) @ B ever reaches memory.

For decode-sized M (at most DECODE_MAX_M rows, rank at most DECODE_MAX_R) the
launchers of kernels/split_k.py split K over the grid instead, so that a
product bound by reading W once has programs on every SM.

Every operand is addressed through its strides, so an nn.Linear weight seen as
`weight.T`, a Conv1D weight, and PEFT's `lora_A.weight.T` / `lora_B.weight.T`
are read in place. Ragged edges are masked, never padded.

LoRA dropout (DROPOUT_INPUT): the low-rank path sees D = keep * x / (1 - p),
applied by the shrink to the x tiles it loads; keep is Philox (`tl.rand`) of
(seed, m * K + k), so any kernel regenerates the same mask element by element
and it is never stored. The backward's dX applies it to its output instead
(DROPOUT_OUTPUT: dX = dY @ W.T + keep/(1-p) * s * g @ A.T), and dA = s * D.T @ g
is the shrink kernel on transposed views with the mask's coordinates swapped.

A and B may be fp32 while x and W are 16-bit (PEFT's fp32 adapters): x tiles are
widened for the low-rank dots, xa is kept in fp32, and the LoRA term meets the
fp32 accumulator before the one rounding to y's dtype.
"""
import torch
import triton
import triton.language as tl

from . import split_k, tile_configs
from .tiles import (dot_precision, grouped_tile, interpreting, k_step, keep_scale, launch_tiles, rank_block,
                    rank_product, tile_ptrs, tuned)
from .torch_path import DROPOUT_INPUT, DROPOUT_OUTPUT, NO_DROPOUT


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R, seed, p,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_xam, stride_xar, mask_stride_m, mask_stride_k,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[m, r] = sum_k D[m, k] * A[k, r], D = x or, with DROPOUT, x * keep / (1 - p); x is widened to A's
    dtype. grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = tile_ptrs(x_ptr, offs_m, offs_k, stride_xm, stride_xk)
    a_ptrs = tile_ptrs(a_ptr, offs_k, offs_r, stride_ak, stride_ar)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
        if DROPOUT:
            x = x * keep_scale(seed, p, offs_m, k0 + offs_k, mask_stride_m, mask_stride_k)
        acc = tl.dot(x.to(a.dtype), a, acc, input_precision=PRECISION)
        x_ptrs += k_step(stride_xk, BLOCK_K)
        a_ptrs += k_step(stride_ak, BLOCK_K)
    tl.store(tile_ptrs(xa_ptr, offs_m, offs_r, stride_xam, stride_xar), acc.to(xa_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, b_ptr, xa_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale, seed, p, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_br, stride_bn, stride_xam, stride_xar,
    stride_ym, stride_yn, mask_stride_row, mask_stride_col,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y, xa (M, R) already written by the shrink. M_BUCKET only keys the
    autotuner. DROPOUT: NO_DROPOUT, or DROPOUT_OUTPUT (the LoRA term is masked at y's coordinates (m, n),
    mask_stride_* mapping them to mask indices); DROPOUT_INPUT is the shrink's to apply.

    The accumulator starts as s * xa @ B and the K loop adds x @ W on top: one (BLOCK_M, BLOCK_N) fp32
    tile alive, so the large tiles fit in registers.
    """
    pid_n, offs_m, offs_n, mask_m, mask_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = rank_product(acc, xa_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_xam, stride_xar,
                       stride_br, stride_bn, LORA_PRECISION, BLOCK_R) * scale
    if DROPOUT == 2:  # DROPOUT_OUTPUT
        acc = acc * keep_scale(seed, p, offs_m, offs_n, mask_stride_row, mask_stride_col)
    x_ptrs = tile_ptrs(x_ptr, offs_m, offs_k, stride_xm, stride_xk)
    w_ptrs = tile_ptrs(w_ptr, offs_k, offs_n, stride_wk, stride_wn)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += k_step(stride_xk, BLOCK_K)
        w_ptrs += k_step(stride_wk, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(tile_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn), acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


_lora_fwd_tuned = tuned(_lora_fwd_kernel, key=["M_BUCKET", "N", "K", "R", "DROPOUT", "PRECISION", "LORA_PRECISION"])


def lora_fwd(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             scale: float, bias=None, dropout_p: float = 0.0, seed: int = 0, dropout: int = DROPOUT_INPUT):
    """Fused forward on already-checked operands.

    x: (M, K); w: (K, N); a: (K, r); b: (r, N); bias: (N,) or None; any strides;
    x, w, bias one floating dtype; a, b that dtype or fp32. With dropout_p > 0,
    `dropout` says where the mask (of `seed`) applies: DROPOUT_INPUT, the forward's
    x, with mask index m * K + k; DROPOUT_OUTPUT, the backward's dX, whose (M, N)
    output has the forward's x coordinates, with mask index m * N + n.
    Returns (y (M, N) in x's dtype, xa (M, r) in a's dtype).
    """
    M, K = x.shape
    N, R = w.shape[1], a.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return y, xa
    if K == 0:
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
        return y, xa.zero_()
    mode = dropout if dropout_p > 0 else NO_DROPOUT
    mask_strides = (N, 1) if mode == DROPOUT_OUTPUT else (K, 1)
    if M <= tile_configs.DECODE_MAX_M and R <= split_k.DECODE_MAX_R:
        split_k.lora_decode_fwd(x, w, a, b, scale, bias, y, xa, float(dropout_p), seed, mode, mask_strides)
        return y, xa
    shrink(x, a, xa, dropout_p if mode == DROPOUT_INPUT else 0.0, seed, mask_strides)
    args = (
        x, w, b, xa, bias if bias is not None else y, y,
        M, N, K, R, float(scale), seed, float(dropout_p), triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), b.stride(0), b.stride(1),
        xa.stride(0), xa.stride(1), y.stride(0), y.stride(1), *mask_strides,
    )
    flags = dict(HAS_BIAS=bias is not None, DROPOUT=mode if mode == DROPOUT_OUTPUT else NO_DROPOUT,
                 PRECISION=dot_precision(x.dtype), LORA_PRECISION=dot_precision(a.dtype), BLOCK_R=rank_block(R))
    launch_tiles(_lora_fwd_kernel, _lora_fwd_tuned, M, N, args, flags)
    return y, xa


def shrink(x: torch.Tensor, a: torch.Tensor, out: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
           mask_strides=(0, 0)) -> torch.Tensor:
    """out (M, r) = D @ a for x (M, K), a (K, r), any strides; D = x, or with dropout_p > 0 x times the mask
    of `seed`, whose index for x[m, k] is m * mask_strides[0] + k * mask_strides[1]. Used for xa in the
    forward and, on transposed views, for dA = D.T @ g in the backward."""
    M, K = x.shape
    R = a.shape[1]
    block, block_r = 32 if interpreting() else 64, rank_block(R)
    grid = (triton.cdiv(M, block), triton.cdiv(R, block_r))
    _shrink_kernel[grid](
        x, a, out, M, K, R, seed, float(dropout_p),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1), *mask_strides,
        DROPOUT=dropout_p > 0, PRECISION=dot_precision(a.dtype), BLOCK_M=block, BLOCK_K=block, BLOCK_R=block_r,
    )
    return out


def dropped_t_matmul(x: torch.Tensor, g: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """D.T @ g, (K, r), for x (M, K), g (M, r): the shrink kernel on x.T, the mask read at x's coordinates
    (index m * K + k), in g's dtype: the backward's dA / s."""
    M, K = x.shape
    out = torch.empty((K, g.shape[1]), device=x.device, dtype=g.dtype)
    if out.numel() == 0 or M == 0:
        return out.zero_()
    return shrink(x.T, g, out, dropout_p, seed, mask_strides=(1, K))
