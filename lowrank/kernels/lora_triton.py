"""Triton kernels for the fused LoRA matmul and their launcher.

    y = x @ W + s * (x @ A) @ B + bias        x (M, K), W (K, N), A (K, r), B (r, N)

Two launches for prefill-sized M:

1. `_shrink_kernel` writes xa = x @ A, (M, r): small, and the backward reuses it.
2. `_lora_fwd_kernel` computes one (BLOCK_M, BLOCK_N) tile of y per program: the
   accumulator starts as s * xa_tile @ B_tile (one fp32 tile in registers, not
   two), the K loop adds x @ W, the epilogue the bias, and y is written once.
   Neither x @ W nor the unscaled (x @ A) @ B ever reaches memory.

Both are made of kernels/tiles.py's pieces: the shrink is one `k_loop` over x's
rows and A's ranks; the forward is `grouped_tile`, `rank_product`, a `k_loop`
over x @ W and `write_output`.

For decode-sized M (at most DECODE_MAX_M rows, rank at most DECODE_MAX_R) the
launchers of kernels/split_k.py split K over the grid instead, so that a
product bound by reading W once has programs on every SM.

Every operand is addressed through its strides, so an nn.Linear weight seen as
`weight.T`, a Conv1D weight, and PEFT's `lora_A.weight.T` / `lora_B.weight.T`
are read in place. Ragged edges are masked, never padded.

LoRA dropout (DROPOUT_INPUT): the low-rank path sees D = keep * x / (1 - p),
applied by the shrink to the x tiles it loads; keep is Philox (`tl.rand`) of
(seed, m * K + k), so any kernel regenerates the same mask element by element
and it is never stored. The seed is a one-element int64 tensor the kernels read
on the device: a compiled graph (or a CUDA graph replay) draws a new one
without a host sync. The backward's dX applies it to its output instead
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
from .tiles import (dot_precision, filled_without_launch, fused_outputs, grouped_tile, k_loop, keep_scale,
                    launch_tiles, load_seed, rank_block, rank_product, seed_pointer, shrink_blocks, store_tile,
                    tuned, write_output)
from .torch_path import DROPOUT_INPUT, DROPOUT_OUTPUT, NO_DROPOUT


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R, seed_ptr, p,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_xam, stride_xar, mask_stride_m, mask_stride_k,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[m, r] = sum_k D[m, k] * A[k, r], D = x or, with DROPOUT, x * keep / (1 - p); x is widened to A's
    dtype. grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m, mask_r = offs_m < M, offs_r < R
    xa = k_loop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, a_ptr, offs_m, offs_r, mask_m, mask_r,
                0, K, stride_xm, stride_xk, stride_ak, stride_ar, PRECISION, BLOCK_K,
                DROPOUT, load_seed(seed_ptr, DROPOUT), p, mask_stride_m, mask_stride_k)
    store_tile(xa_ptr, xa, offs_m, offs_r, mask_m, mask_r, stride_xam, stride_xar)


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, b_ptr, xa_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale, seed_ptr, p, M_BUCKET,
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
    offs_m, offs_n, mask_m, mask_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = rank_product(acc, xa_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_xam, stride_xar,
                       stride_br, stride_bn, LORA_PRECISION, BLOCK_R) * scale
    if DROPOUT == 2:  # DROPOUT_OUTPUT
        acc = acc * keep_scale(tl.load(seed_ptr), p, offs_m, offs_n, mask_stride_row, mask_stride_col)
    acc = k_loop(acc, x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, 0, K, stride_xm, stride_xk, stride_wk, stride_wn,
                 PRECISION, BLOCK_K)
    write_output(y_ptr, acc, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS)


_lora_fwd_tuned = tuned(_lora_fwd_kernel, key=["M_BUCKET", "N", "K", "R", "DROPOUT", "PRECISION", "LORA_PRECISION"])


def lora_fwd(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             scale: float, bias=None, dropout_p: float = 0.0, seed=None, dropout: int = DROPOUT_INPUT):
    """Fused forward on already-checked operands.

    x: (M, K); w: (K, N); a: (K, r); b: (r, N); bias: (N,) or None; any strides;
    x, w, bias one floating dtype; a, b that dtype or fp32. With dropout_p > 0,
    seed is a (1,) int64 tensor on x's device and `dropout` says where its mask applies: DROPOUT_INPUT, the forward's
    x, with mask index m * K + k; DROPOUT_OUTPUT, the backward's dX, whose (M, N)
    output has the forward's x coordinates, with mask index m * N + n.
    Returns (y (M, N) in x's dtype, xa (M, r) in a's dtype).
    """
    M, K = x.shape
    N, R = w.shape[1], a.shape[1]
    y, xa, done = fused_outputs(x, N, R, a.dtype, bias)
    if done:
        return y, xa
    mode = dropout if dropout_p > 0 else NO_DROPOUT
    mask_strides = (N, 1) if mode == DROPOUT_OUTPUT else (K, 1)
    if M <= tile_configs.DECODE_MAX_M and R <= split_k.DECODE_MAX_R:
        split_k.lora_decode_fwd(x, w, a, b, scale, bias, y, xa, float(dropout_p), seed, mode, mask_strides)
        return y, xa
    shrink(x, a, xa, dropout_p if mode == DROPOUT_INPUT else 0.0, seed, mask_strides)
    args = (
        x, w, b, xa, bias if bias is not None else y, y,
        M, N, K, R, float(scale), seed_pointer(seed, x), float(dropout_p), triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), b.stride(0), b.stride(1),
        xa.stride(0), xa.stride(1), y.stride(0), y.stride(1), *mask_strides,
    )
    flags = dict(HAS_BIAS=bias is not None, DROPOUT=mode if mode == DROPOUT_OUTPUT else NO_DROPOUT,
                 PRECISION=dot_precision(x.dtype), LORA_PRECISION=dot_precision(a.dtype), BLOCK_R=rank_block(R))
    launch_tiles(_lora_fwd_kernel, _lora_fwd_tuned, M, N, args, flags)
    return y, xa


def shrink(x: torch.Tensor, a: torch.Tensor, out: torch.Tensor, dropout_p: float = 0.0, seed=None,
           mask_strides=(0, 0)) -> torch.Tensor:
    """out (M, r) = D @ a for x (M, K), a (K, r), any strides, K > 0; D = x, or with dropout_p > 0 x times
    the mask of `seed` (a (1,) int64 tensor), whose index for x[m, k] is m * mask_strides[0] +
    k * mask_strides[1]. Used for xa in the forward and, on transposed views, for dA = D.T @ g in the
    backward."""
    M, K = x.shape
    R = a.shape[1]
    block_m, block_k = shrink_blocks(M)
    block_r = rank_block(R)
    _shrink_kernel[(triton.cdiv(M, block_m), triton.cdiv(R, block_r))](
        x, a, out, M, K, R, seed_pointer(seed, x), float(dropout_p),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1), *mask_strides,
        DROPOUT=dropout_p > 0, PRECISION=dot_precision(a.dtype), BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_R=block_r,
    )
    return out


def dropped_t_matmul(x: torch.Tensor, g: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    """D.T @ g, (K, r), for x (M, K), g (M, r): the shrink kernel on x.T, the mask read at x's coordinates
    (index m * K + k), in g's dtype: the backward's dA / s."""
    M, K = x.shape
    out = torch.empty((K, g.shape[1]), device=x.device, dtype=g.dtype)
    if filled_without_launch(out, M):
        return out
    return shrink(x.T, g, out, dropout_p, seed, mask_strides=(1, K))
