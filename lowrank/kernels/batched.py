"""Triton kernels for mixed-adapter batches: each row of x names its own LoRA adapter.

    y[m] = x[m] @ W + s[i] * (x[m] @ A[i]) @ B[i] + bias,   i = adapter_index[m]
    (i = -1: the base product only)

x (M, K), W (K, N), A_stack (n, K, r), B_stack (n, r, N), scales (n,).

The launcher sorts the rows by adapter (a permutation, no copy: the kernels
gather rows through it). The base GEMM runs over tiles of consecutive sorted
rows, so W is read exactly as by the single-adapter kernel whatever the mix. A
tile's sorted rows hold a contiguous range of adapter ids, usually one in
prefill; the shrink and the low-rank term loop over that range with masked
dots, so a tile pays one small dot per adapter it holds. The low-rank term
seeds the tile's one fp32 accumulator, which the K loop then adds x @ W to.
Adapters of lower rank are zero-padded to r inside the stacks: the padded
columns add exact zeros. The pieces (the K loop, the rank-sliced xa @ B, the
epilogue) are kernels/tiles.py's, as in the single-adapter kernels, over
gathered rows.

Decode-sized batches (M <= DECODE_MAX_M) split K as the single-adapter path
does (kernels/split_k.py): the base product's slices are summed by an epilogue
that adds the adapters' terms.
"""
import torch
import triton
import triton.language as tl

from . import split_k, tile_configs
from .tiles import (dot_precision, fused_outputs, grouped_tile, k_loop, launch_tiles, rank_block,
                    rank_product, shrink_blocks, store_tile, sum_splits, tuned, write_output)


@triton.jit
def _tile_adapter_range(idx_ptr, offs_m, M):
    """Sorted adapter ids of a tile's rows, and the range [lo, hi] of non-negative ids among them (int32:
    the loops over them cast to int64 where an id multiplies a stride)."""
    mask_m = offs_m < M
    ad = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)
    lo = tl.min(tl.where(ad >= 0, ad, 2147483647), axis=0)
    hi = tl.max(ad, axis=0)
    return ad, lo, hi


@triton.jit
def _adapters_product(xa_ptr, b_ptr, scales_ptr, idx_ptr, offs_m, offs_n, mask_n, M, R,
                      stride_xam, stride_xar, stride_b_adapter, stride_br, stride_bn,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """s[i] * xa @ B[i] on each row of a (BLOCK_M, BLOCK_N) tile of sorted rows, i its adapter (0 on base
    rows), in one fp32 tile: every row sees only its own adapter's B, so the scales apply per row after."""
    ad, lo, hi = _tile_adapter_range(idx_ptr, offs_m, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for adapter in range(lo, hi + 1):
        b_adapter = b_ptr + tl.cast(adapter, tl.int64) * stride_b_adapter
        acc = rank_product(acc, xa_ptr, b_adapter, offs_m, offs_n, ad == adapter, mask_n, R,
                           stride_xam, stride_xar, stride_br, stride_bn, PRECISION, BLOCK_R)
    return acc * tl.load(scales_ptr + ad, mask=ad >= 0, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _batched_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, rows_ptr, idx_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_a_adapter, stride_ak, stride_ar, stride_xam, stride_xar,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[j] = x[rows[j]] @ A[idx[j]] for sorted positions j; zero where idx[j] = -1.
    grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m, mask_r = offs_m < M, offs_r < R
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    ad, lo, hi = _tile_adapter_range(idx_ptr, offs_m, M)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for adapter in range(lo, hi + 1):
        a_adapter = a_ptr + tl.cast(adapter, tl.int64) * stride_a_adapter
        xa = k_loop(xa, x_ptr, a_adapter, rows, offs_r, ad == adapter, mask_r, 0, K,
                    stride_xm, stride_xk, stride_ak, stride_ar, PRECISION, BLOCK_K)
    store_tile(xa_ptr, xa, offs_m, offs_r, mask_m, mask_r, stride_xam, stride_xar)


@triton.jit
def _batched_fwd_kernel(
    x_ptr, w_ptr, b_ptr, xa_ptr, bias_ptr, y_ptr, rows_ptr, idx_ptr, scales_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_b_adapter, stride_br, stride_bn,
    stride_xam, stride_xar, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y over sorted rows; M_BUCKET only keys the autotuner."""
    offs_m, offs_n, mask_m, mask_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    acc = _adapters_product(xa_ptr, b_ptr, scales_ptr, idx_ptr, offs_m, offs_n, mask_n, M, R,
                            stride_xam, stride_xar, stride_b_adapter, stride_br, stride_bn,
                            PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    acc = k_loop(acc, x_ptr, w_ptr, rows, offs_n, mask_m, mask_n, 0, K, stride_xm, stride_xk, stride_wk, stride_wn,
                 PRECISION, BLOCK_K)
    write_output(y_ptr, acc, bias_ptr, rows, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _batched_split_k_epilogue_kernel(
    part_ptr, nsplit_ptr, b_ptr, xa_ptr, bias_ptr, y_ptr, rows_ptr, idx_ptr, scales_ptr,
    M, N, R,
    stride_b_adapter, stride_br, stride_bn, stride_xam, stride_xar, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y tile over sorted rows = sum_s part[s] (in row order) + the adapters' terms (+ bias).
    grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    acc = sum_splits(part_ptr, nsplit_ptr, rows, offs_n, mask_m, mask_n, M, N, BLOCK_M, BLOCK_N)
    acc += _adapters_product(xa_ptr, b_ptr, scales_ptr, idx_ptr, offs_m, offs_n, mask_n, M, R,
                             stride_xam, stride_xar, stride_b_adapter, stride_br, stride_bn,
                             PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    write_output(y_ptr, acc, bias_ptr, rows, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS)


_batched_fwd_tuned = tuned(_batched_fwd_kernel, key=["M_BUCKET", "N", "K", "R", "PRECISION"])


def lora_batched_fwd(x, w, a_stack, b_stack, scales, order, idx_sorted, bias=None):
    """Mixed-adapter forward on already-checked operands.

    x (M, K); w (K, N); a_stack (n, K, r); b_stack (n, r, N), any strides;
    scales (n,) fp32; order (M,) int64, the rows sorted by adapter; idx_sorted
    (M,) int32, their adapter ids (-1 = base). Returns (y (M, N) in row order,
    xa (M, r) in sorted order).
    """
    M, K = x.shape
    N, R = w.shape[1], a_stack.shape[2]
    y, xa, done = fused_outputs(x, N, R, x.dtype, bias)
    if done:
        return y, xa
    precision = dot_precision(x.dtype)
    block_m, block_k = shrink_blocks(M)
    block_r = rank_block(R)
    _batched_shrink_kernel[(triton.cdiv(M, block_m), triton.cdiv(R, block_r))](
        x, a_stack, xa, order, idx_sorted, M, K, R,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        xa.stride(0), xa.stride(1),
        PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
    )
    lora_strides = (b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), xa.stride(0), xa.stride(1))
    if M <= tile_configs.DECODE_MAX_M:
        part, _, nsplit = split_k.split_k_partials(x, w)
        split_k.launch_epilogue(
            _batched_split_k_epilogue_kernel, M, N, R,
            (part, nsplit, b_stack, xa, bias if bias is not None else y, y, order, idx_sorted, scales,
             M, N, R, *lora_strides, y.stride(0), y.stride(1)),
            dict(HAS_BIAS=bias is not None, PRECISION=precision))
        return y, xa
    args = (
        x, w, b_stack, xa, bias if bias is not None else y, y, order, idx_sorted, scales,
        M, N, K, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), *lora_strides, y.stride(0), y.stride(1),
    )
    flags = dict(HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_R=block_r)
    launch_tiles(_batched_fwd_kernel, _batched_fwd_tuned, M, N, args, flags)
    return y, xa
