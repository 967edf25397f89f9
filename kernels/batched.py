"""Triton kernels for mixed-adapter batches: each row of x names its own LoRA adapter.

    y[m] = x[m] @ W + s[i] * (x[m] @ A[i]) @ B[i] + bias,   i = adapter_index[m]
    (i = -1: the base product only)

x (M, K), W (K, N), A_stack (n, K, r), B_stack (n, r, N), scales (n,).

The launcher sorts the rows by adapter (a permutation, no copy: the kernels
gather rows through it). The base GEMM runs over tiles of consecutive sorted
rows, so W is read exactly as by the single-adapter kernel whatever the mix. A
tile's sorted rows hold a contiguous range of adapter ids, usually one in
prefill; the shrink and the epilogue loop over that range with masked dots, so
a tile pays one small dot per adapter it holds. Adapters of lower rank are
zero-padded to r inside the stacks: the padded columns add exact zeros.
"""
import torch
import triton
import triton.language as tl

from .lora_triton import _dot_precision, _fwd_configs, _grouped_tile, _interpreting, launch_tiles, rank_block


@triton.jit
def _tile_adapter_range(idx_ptr, offs_m, M):
    """Sorted adapter ids of a tile's rows, and the range [lo, hi] of non-negative ids among them."""
    mask_m = offs_m < M
    ad = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)
    lo = tl.min(tl.where(ad >= 0, ad, 2147483647), axis=0)
    hi = tl.max(ad, axis=0)
    return ad, lo, hi


@triton.jit
def _batched_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, rows_ptr, idx_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_an, stride_ak, stride_ar, stride_xam, stride_xar,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[j] = x[rows[j]] @ A[idx[j]] for sorted positions j; zero where idx[j] = -1."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.load(rows_ptr + offs_m, mask=offs_m < M, other=0)
    ad, lo, hi = _tile_adapter_range(idx_ptr, offs_m, M)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for adapter in range(lo, hi + 1):
        sel = ad == adapter
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                        mask=sel[:, None] & mask_k[None, :], other=0.0)
            a = tl.load(a_ptr + adapter * stride_an + (k0 + offs_k)[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                        mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
    xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _batched_fwd_kernel(
    x_ptr, w_ptr, b_ptr, xa_ptr, bias_ptr, y_ptr, rows_ptr, idx_ptr, scales_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_bn_, stride_br, stride_bcol,
    stride_xam, stride_xar, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y over sorted rows; M_BUCKET only keys the autotuner."""
    _, offs_m, offs_n, mask_m, mask_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    ad, lo, hi = _tile_adapter_range(idx_ptr, offs_m, M)
    for adapter in range(lo, hi + 1):
        sel = ad == adapter
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + (r0 + offs_r)[None, :] * stride_xar,
                         mask=sel[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_ptr + adapter * stride_bn_ + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bcol,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            lora = tl.dot(xa, b, lora, input_precision=PRECISION)
        acc += tl.load(scales_ptr + adapter).to(tl.float32) * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_batched_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=["M_BUCKET", "N", "K", "R"])(_batched_fwd_kernel)


def lora_batched_fwd(x, w, a_stack, b_stack, scales, order, idx_sorted, bias=None):
    """Mixed-adapter forward on already-checked operands.

    x (M, K); w (K, N); a_stack (n, K, r); b_stack (n, r, N), any strides;
    scales (n,) fp32; order (M,) int64, the rows sorted by adapter; idx_sorted
    (M,) int32, their adapter ids (-1 = base). Returns (y (M, N) in row order,
    xa (M, r) in sorted order).
    """
    M, K = x.shape
    N, R = w.shape[1], a_stack.shape[2]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y, xa
    precision = _dot_precision(x.dtype)
    block_r = rank_block(R)
    shrink_m, shrink_k = (32, 32) if _interpreting() else (16 if M <= 64 else 64, 64)
    _batched_shrink_kernel[(triton.cdiv(M, shrink_m), triton.cdiv(R, block_r))](
        x, a_stack, xa, order, idx_sorted, M, K, R,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        xa.stride(0), xa.stride(1),
        PRECISION=precision, BLOCK_M=shrink_m, BLOCK_K=shrink_k, BLOCK_R=block_r,
    )
    args = (
        x, w, b_stack, xa, bias if bias is not None else y, y, order, idx_sorted, scales,
        M, N, K, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        xa.stride(0), xa.stride(1), y.stride(0), y.stride(1),
    )
    flags = dict(HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_R=block_r)
    launch_tiles(_batched_fwd_kernel, _batched_fwd_tuned, M, N, args, flags)
    return y, xa
