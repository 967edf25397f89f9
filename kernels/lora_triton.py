"""Triton kernels for the fused LoRA matmul and their launcher.

    y = x @ W + s * (x @ A) @ B + bias        x (M, K), W (K, N), A (K, r), B (r, N)

Two launches for prefill-sized M:

1. `_shrink_kernel` writes xa = x @ A, (M, r): small, and the backward reuses it.
2. `_lora_fwd_kernel` computes one (BLOCK_M, BLOCK_N) tile of y per program: the
   accumulator starts as s * xa_tile @ B_tile (one fp32 tile in registers, not
   two), the K loop adds x @ W, the epilogue the bias, and y is written once.
   Neither x @ W nor the unscaled (x @ A) @ B ever reaches memory.

For decode-sized M the shrink is folded into the main K loop (SHRINK_IN_LOOP):
every column block recomputes its rows of x @ A, which costs 2*M*K*r flops per
column block but saves a launch while the product is bound by reading W.

Every operand is addressed through its strides, so an nn.Linear weight seen as
`weight.T`, a Conv1D weight, and PEFT's `lora_A.weight.T` / `lora_B.weight.T`
are read in place. Ragged edges are masked, never padded.

LoRA dropout (DROPOUT_INPUT): the low-rank path sees D = keep * x / (1 - p),
made from the x tile already loaded for x @ W; keep is Philox (`tl.rand`) of
(seed, m * K + k), so any kernel regenerates the same mask element by element
and it is never stored. The backward's dX applies it to its output instead
(DROPOUT_OUTPUT: dX = dY @ W.T + keep/(1-p) * s * g @ A.T), and dA = s * D.T @ g
is the shrink kernel on transposed views with the mask's coordinates swapped.

A and B may be fp32 while x and W are 16-bit (PEFT's fp32 adapters): x tiles are
widened for the low-rank dots, xa is kept in fp32, and the LoRA term meets the
fp32 accumulator before the one rounding to y's dtype.
"""
import os

import torch
import triton
import triton.language as tl

from .torch_ref import DROPOUT_INPUT, DROPOUT_OUTPUT, NO_DROPOUT

# Rows at or below which the shrink runs inside the main loop (one launch).
DECODE_MAX_M = 64
# Ranks above this keep the two-launch path: xa would not fit in registers.
IN_LOOP_MAX_R = 64


@triton.jit
def _keep_scale(seed, p, offs_row, offs_col, mask_stride_row, mask_stride_col):
    """keep / (1 - p) in fp32 for a (rows, cols) tile: LoRA dropout's mask at these coordinates, where the
    element (row, col) is mask element row * mask_stride_row + col * mask_stride_col (int64: no overflow
    past 2^31 elements). Philox of (seed, that index): the same number in every kernel that asks."""
    index = offs_row[:, None].to(tl.int64) * mask_stride_row + offs_col[None, :].to(tl.int64) * mask_stride_col
    return tl.where(tl.rand(seed, index) >= p, 1.0 / (1.0 - p), 0.0)


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
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
        if DROPOUT:
            x = x * _keep_scale(seed, p, offs_m, k0 + offs_k, mask_stride_m, mask_stride_k)
        acc = tl.dot(x.to(a.dtype), a, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile of the (M, N) output: (pid_n, offs_m, offs_n, mask_m, mask_n).
    Grouped launch order: GROUP_M row blocks share each column block of W while it sits in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale, seed, p, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar,
    stride_br, stride_bn, stride_xam, stride_xar, stride_ym, stride_yn, mask_stride_row, mask_stride_col,
    HAS_BIAS: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y. M_BUCKET only keys the autotuner.

    SHRINK_IN_LOOP: xa is accumulated beside x @ W and written by the first
    column block (BLOCK_R must cover R). Otherwise xa is read from xa_ptr in
    BLOCK_R-wide slices. DROPOUT: NO_DROPOUT, DROPOUT_INPUT (the in-loop shrink
    sees the mask at x's coordinates (m, k)) or DROPOUT_OUTPUT (the LoRA term is
    masked at y's coordinates (m, n)); mask_stride_* map coordinates to mask indices.
    """
    pid_n, offs_m, offs_n, mask_m, mask_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not SHRINK_IN_LOOP:
        # xa is ready (the shrink kernel wrote it): seed the accumulator with s * xa @ B, masked for
        # DROPOUT_OUTPUT, so that the large prefill tiles hold one (BLOCK_M, BLOCK_N) fp32 tile, not two.
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + (r0 + offs_r)[None, :] * stride_xar
            b_ptrs = b_ptr + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bn
            xa = tl.load(xa_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(xa, b, acc, input_precision=LORA_PRECISION)
        acc = acc * scale
        if DROPOUT == 2:  # DROPOUT_OUTPUT
            acc = acc * _keep_scale(seed, p, offs_m, offs_n, mask_stride_row, mask_stride_col)
    xa_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if SHRINK_IN_LOOP:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            if DROPOUT == 1:  # DROPOUT_INPUT: the x tile already loaded, masked for the low-rank path only
                x = x * _keep_scale(seed, p, offs_m, k0 + offs_k, mask_stride_row, mask_stride_col)
            xa_acc = tl.dot(x.to(a.dtype), a, xa_acc, input_precision=LORA_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if SHRINK_IN_LOOP:
        # Epilogue (decode tiles, small): lora = xa @ B in fp32, with xa rounded to A's dtype as the
        # unfused expression rounds it, then y = acc + s * lora.
        xa = xa_acc.to(xa_ptr.dtype.element_ty)
        mask_r = offs_r < R
        if pid_n == 0:
            xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
            tl.store(xa_ptrs, xa, mask=mask_m[:, None] & mask_r[None, :])
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lora = tl.dot(xa, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision=LORA_PRECISION)
        if DROPOUT == 2:  # DROPOUT_OUTPUT
            lora = lora * _keep_scale(seed, p, offs_m, offs_n, mask_stride_row, mask_stride_col)
        acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _fwd_configs():
    """Short list: large tiles for prefill, narrow column tiles with deep K for decode."""
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=3),
        cfg({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
    ]


_lora_fwd_tuned = triton.autotune(configs=_fwd_configs(),
                                  key=["M_BUCKET", "N", "K", "R", "SHRINK_IN_LOOP", "DROPOUT"])(
    _lora_fwd_kernel
)

# Under the interpreter every program runs in NumPy: few, mid-sized tiles are fastest.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if _interpreting():
    from .interpreter import patch_bf16_dot

    patch_bf16_dot()


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 switch, as torch.matmul does; 16-bit types use tensor cores."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def rank_block(R: int) -> int:
    """BLOCK_R for reading xa or A in rank slices: R rounded up to a power of 2, within 16..64."""
    return min(64, max(16, triton.next_power_of_2(R)))


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
    in_loop = M <= DECODE_MAX_M and R <= IN_LOOP_MAX_R
    block_r = max(16, triton.next_power_of_2(R)) if in_loop else rank_block(R)
    kernel_mode = mode
    if not in_loop:
        shrink(x, a, xa, dropout_p if mode == DROPOUT_INPUT else 0.0, seed, mask_strides)
        if mode == DROPOUT_INPUT:
            kernel_mode = NO_DROPOUT  # the shrink applied it
    args = (
        x, w, a, b, xa, bias if bias is not None else y, y,
        M, N, K, R, float(scale), seed, float(dropout_p), triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), xa.stride(0), xa.stride(1), y.stride(0), y.stride(1), *mask_strides,
    )
    flags = dict(HAS_BIAS=bias is not None, SHRINK_IN_LOOP=in_loop, DROPOUT=kernel_mode,
                 PRECISION=_dot_precision(x.dtype), LORA_PRECISION=_dot_precision(a.dtype), BLOCK_R=block_r)
    launch_tiles(_lora_fwd_kernel, _lora_fwd_tuned, M, N, args, flags)
    return y, xa


def shrink(x: torch.Tensor, a: torch.Tensor, out: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
           mask_strides=(0, 0)) -> torch.Tensor:
    """out (M, r) = D @ a for x (M, K), a (K, r), any strides; D = x, or with dropout_p > 0 x times the mask
    of `seed`, whose index for x[m, k] is m * mask_strides[0] + k * mask_strides[1]. Used for xa in the
    forward and, on transposed views, for dA = D.T @ g in the backward."""
    M, K = x.shape
    R = a.shape[1]
    block, block_r = 32 if _interpreting() else 64, rank_block(R)
    grid = (triton.cdiv(M, block), triton.cdiv(R, block_r))
    _shrink_kernel[grid](
        x, a, out, M, K, R, seed, float(dropout_p),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1), *mask_strides,
        DROPOUT=dropout_p > 0, PRECISION=_dot_precision(a.dtype), BLOCK_M=block, BLOCK_K=block, BLOCK_R=block_r,
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


def launch_tiles(kernel, tuned, M, N, args, flags) -> None:
    """Run a kernel tiled over an (M, N) output, one program per (BLOCK_M, BLOCK_N) tile: `tuned` (its
    autotuned form) on a GPU, `kernel` with fixed small blocks under the interpreter."""
    if _interpreting():
        grid = (triton.cdiv(M, _INTERPRET_BLOCKS["BLOCK_M"]) * triton.cdiv(N, _INTERPRET_BLOCKS["BLOCK_N"]),)
        kernel[grid](*args, **flags, **_INTERPRET_BLOCKS)
    else:
        tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
