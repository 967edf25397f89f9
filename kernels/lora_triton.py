"""Triton kernels for the fused LoRA matmul and their launcher.

    y = x @ W + s * (x @ A) @ B + bias        x (M, K), W (K, N), A (K, r), B (r, N)

Two launches for prefill-sized M:

1. `_shrink_kernel` writes xa = x @ A, (M, r): small, and the backward reuses it.
2. `_lora_fwd_kernel` computes one (BLOCK_M, BLOCK_N) tile of y per program: the
   K loop accumulates x @ W in fp32 registers, the epilogue adds
   s * xa_tile @ B_tile and the bias, and y is written once. Neither x @ W nor
   the unscaled (x @ A) @ B ever reaches memory.

For decode-sized M the shrink is folded into the main K loop (SHRINK_IN_LOOP):
every column block recomputes its rows of x @ A, which costs 2*M*K*r flops per
column block but saves a launch while the product is bound by reading W.

Every operand is addressed through its strides, so an nn.Linear weight seen as
`weight.T`, a Conv1D weight, and PEFT's `lora_A.weight.T` / `lora_B.weight.T`
are read in place. Ragged edges are masked, never padded.
"""
import os

import torch
import triton
import triton.language as tl

# Rows at or below which the shrink runs inside the main loop (one launch).
DECODE_MAX_M = 64
# Ranks above this keep the two-launch path: xa would not fit in registers.
IN_LOOP_MAX_R = 64


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_xam, stride_xar,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa[m, r] = sum_k x[m, k] * A[k, r]; grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
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
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
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
    M, N, K, R, scale, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar,
    stride_br, stride_bn, stride_xam, stride_xar, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y. M_BUCKET only keys the autotuner.

    SHRINK_IN_LOOP: xa is accumulated beside x @ W and written by the first
    column block (BLOCK_R must cover R). Otherwise xa is read from xa_ptr in
    BLOCK_R-wide slices.
    """
    pid_n, offs_m, offs_n, mask_m, mask_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if SHRINK_IN_LOOP:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            xa_acc = tl.dot(x, a, xa_acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: lora = xa @ B in fp32, with xa rounded to the input dtype as the
    # unfused expression rounds it, then y = acc + s * lora + bias.
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SHRINK_IN_LOOP:
        xa = xa_acc.to(xa_ptr.dtype.element_ty)
        mask_r = offs_r < R
        if pid_n == 0:
            xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
            tl.store(xa_ptrs, xa, mask=mask_m[:, None] & mask_r[None, :])
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lora = tl.dot(xa, b, lora, input_precision=PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + (r0 + offs_r)[None, :] * stride_xar
            b_ptrs = b_ptr + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bn
            xa = tl.load(xa_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            lora = tl.dot(xa, b, lora, input_precision=PRECISION)
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


_lora_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=["M_BUCKET", "N", "K", "R", "SHRINK_IN_LOOP"])(
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


def lora_fwd(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             scale: float, bias=None):
    """Fused forward on already-checked operands.

    x: (M, K); w: (K, N); a: (K, r); b: (r, N); bias: (N,) or None; any strides,
    one floating dtype. Returns (y (M, N), xa (M, r)) in x's dtype.
    """
    M, K = x.shape
    N, R = w.shape[1], a.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y, xa
    if K == 0:
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
        return y, xa.zero_()
    precision = _dot_precision(x.dtype)
    in_loop = M <= DECODE_MAX_M and R <= IN_LOOP_MAX_R
    block_r = max(16, triton.next_power_of_2(R)) if in_loop else min(64, max(16, triton.next_power_of_2(R)))
    if not in_loop:
        shrink_m = 32 if _interpreting() else 64
        shrink_k = 32 if _interpreting() else 64
        grid = (triton.cdiv(M, shrink_m), triton.cdiv(R, block_r))
        _shrink_kernel[grid](
            x, a, xa, M, K, R,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), xa.stride(0), xa.stride(1),
            PRECISION=precision, BLOCK_M=shrink_m, BLOCK_K=shrink_k, BLOCK_R=block_r,
        )
    args = (
        x, w, a, b, xa, bias if bias is not None else y, y,
        M, N, K, R, float(scale), triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), xa.stride(0), xa.stride(1), y.stride(0), y.stride(1),
    )
    flags = dict(HAS_BIAS=bias is not None, SHRINK_IN_LOOP=in_loop, PRECISION=precision, BLOCK_R=block_r)
    launch_tiles(_lora_fwd_kernel, _lora_fwd_tuned, M, N, args, flags)
    return y, xa


def launch_tiles(kernel, tuned, M, N, args, flags) -> None:
    """Run a kernel tiled over an (M, N) output, one program per (BLOCK_M, BLOCK_N) tile: `tuned` (its
    autotuned form) on a GPU, `kernel` with fixed small blocks under the interpreter."""
    if _interpreting():
        grid = (triton.cdiv(M, _INTERPRET_BLOCKS["BLOCK_M"]) * triton.cdiv(N, _INTERPRET_BLOCKS["BLOCK_N"]),)
        kernel[grid](*args, **flags, **_INTERPRET_BLOCKS)
    else:
        tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
