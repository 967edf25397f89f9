"""The building blocks every Triton kernel here is made of, and the launch of a kernel tiled over an (M, N)
output. The kernels (kernels/lora_triton.py, batched.py, split_k.py) are these pieces put in order:

    grouped_tile   which (BLOCK_M, BLOCK_N) tile of the output this program writes
    k_loop         acc + D[rows, k_begin:k_end] @ W[k_begin:k_end, cols]: the masked K loop of every
                   product, x @ W and the shrink x @ A alike (D: x, or x under LoRA dropout's mask)
    rank_product   acc + xa @ B in BLOCK_R-wide rank slices: the low-rank term of an output tile
    sum_splits     the sum of a split-K kernel's fp32 partial products
    write_output   + bias, one rounding to y's dtype, the masked store
    shrink_blocks, rank_block, dot_precision, launch_tiles: the launchers' choices, made once

Element offsets are int64 (`tile_ptrs`, `k_step`): row * stride passes 2^31 elements for 1M tokens at
K = 8192, and so does a column index times M on the backward's transposed views. The indices themselves
(program ids, rows, columns, ranks, loop counters) are int32, as are M, N, K and R: each must be below
2^31. int64 index tensors would cost registers in every loop (ptxas spilled 8-16 bytes in the decode
kernels with them); the pointers are 64-bit anyway.
"""
import os

import torch
import triton
import triton.language as tl

from . import tile_configs


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if interpreting():
    from .interpreter import patch_bf16_dot

    patch_bf16_dot()


# Under the interpreter every program runs in NumPy: few, mid-sized tiles are fastest. Tests set other
# blocks here to run a config the autotuner may pick.
INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def seed_pointer(seed, placeholder: torch.Tensor) -> torch.Tensor:
    """What a kernel's seed_ptr receives: the (1,) int64 seed tensor, or without one (no dropout, the
    pointer is never read) any tensor of the launch."""
    return placeholder if seed is None else seed


@triton.jit
def load_seed(seed_ptr, DROPOUT: tl.constexpr):
    """LoRA dropout's seed, read on the device (a one-element int64 tensor), so that a compiled graph or a
    CUDA graph replay draws a new one without a host sync; 0 (nothing read) without dropout."""
    if DROPOUT:
        return tl.load(seed_ptr)
    else:
        return 0


@triton.jit
def keep_scale(seed, p, offs_row, offs_col, mask_stride_row, mask_stride_col):
    """keep / (1 - p) in fp32 for a (rows, cols) tile: LoRA dropout's mask at these coordinates, where the
    element (row, col) is mask element row * mask_stride_row + col * mask_stride_col (int64: no overflow
    past 2^31 elements). Philox of (seed, that index): the same number in every kernel that asks."""
    index = offs_row[:, None].to(tl.int64) * mask_stride_row + offs_col[None, :].to(tl.int64) * mask_stride_col
    return tl.where(tl.rand(seed, index) >= p, 1.0 / (1.0 - p), 0.0)


@triton.jit
def tile_ptrs(base, rows, cols, stride_rows, stride_cols):
    """Pointers to the (len(rows), len(cols)) tile base[rows[:, None], cols[None, :]], offsets in int64."""
    return base + rows.to(tl.int64)[:, None] * stride_rows + cols.to(tl.int64)[None, :] * stride_cols


@triton.jit
def k_step(stride, BLOCK_K: tl.constexpr):
    """The int64 pointer step of BLOCK_K elements along a dimension of this stride."""
    return tl.cast(stride, tl.int64) * BLOCK_K


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile of the (M, N) output: (offs_m, offs_n, mask_m, mask_n).
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
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def k_loop(acc, x_ptr, w_ptr, rows, cols, row_mask, col_mask, k_begin, k_end,
           stride_xm, stride_xk, stride_wk, stride_wn, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
           DROPOUT: tl.constexpr = False, seed=0, p=0.0, mask_stride_row=0, mask_stride_col=0):
    """acc + D[rows, k_begin:k_end] @ w[k_begin:k_end, cols] on one fp32 tile, D = x (rows where row_mask),
    or with DROPOUT x * keep / (1 - p), the mask read at (row, k) through mask_stride_*; x is taken in w's
    dtype. w is W for the base product x @ W, A for the shrink x @ A (cols then its ranks); rows may be
    gathered (the mixed-adapter kernels' sorted rows)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = tile_ptrs(x_ptr, rows, k_begin + offs_k, stride_xm, stride_xk)
    w_ptrs = tile_ptrs(w_ptr, k_begin + offs_k, cols, stride_wk, stride_wn)
    for k0 in range(k_begin, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            x = x * keep_scale(seed, p, rows, k0 + offs_k, mask_stride_row, mask_stride_col)
        acc = tl.dot(x.to(w.dtype), w, acc, input_precision=PRECISION)
        x_ptrs += k_step(stride_xk, BLOCK_K)
        w_ptrs += k_step(stride_wk, BLOCK_K)
    return acc


@triton.jit
def rank_product(acc, xa_ptr, b_ptr, offs_m, offs_n, row_mask, mask_n, R,
                 stride_xam, stride_xar, stride_br, stride_bn, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + xa @ B on one (BLOCK_M, BLOCK_N) fp32 tile, xa (the rows offs_m where row_mask) read in
    BLOCK_R-wide rank slices: the low-rank term the prefill kernels seed their accumulator with."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        mask_r = offs_r < R - r0
        xa = tl.load(tile_ptrs(xa_ptr, offs_m, r0 + offs_r, stride_xam, stride_xar),
                     mask=row_mask[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(tile_ptrs(b_ptr, r0 + offs_r, offs_n, stride_br, stride_bn),
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xa, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def sum_splits(part_ptr, nsplit_ptr, rows, cols, row_mask, col_mask, M, COLS,
               BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """sum over the K slices s of part[s, rows, cols]: part (splits, M, COLS) fp32, contiguous, and the
    number of slices at nsplit_ptr (the split-K kernel writes both)."""
    splits = tl.load(nsplit_ptr)
    mask = row_mask[:, None] & col_mask[None, :]
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(tile_ptrs(part_ptr, s * M + rows, cols, COLS, 1), mask=mask, other=0.0)
    return acc


@triton.jit
def store_tile(out_ptr, acc, rows, cols, row_mask, col_mask, stride_rows, stride_cols):
    """out[rows, cols] = acc in out's dtype, where row_mask and col_mask."""
    tl.store(tile_ptrs(out_ptr, rows, cols, stride_rows, stride_cols), acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def write_output(y_ptr, acc, bias_ptr, rows, offs_n, row_mask, mask_n, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr):
    """y[rows, offs_n] = acc + bias (with HAS_BIAS), rounded once to y's dtype: how every kernel ends."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, acc, rows, offs_n, row_mask, mask_n, stride_ym, stride_yn)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 switch, as torch.matmul does; 16-bit types use tensor cores."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def rank_block(R: int) -> int:
    """BLOCK_R for reading xa or A in rank slices: R rounded up to a power of 2, within 16..64 (on the
    decode path, where R <= 64, one slice covers all of R)."""
    return min(64, max(16, triton.next_power_of_2(R)))


def shrink_blocks(M: int) -> tuple:
    """(BLOCK_M, BLOCK_K) of the shrink kernels over M rows: 16 rows up to a decode batch, 64 above."""
    if interpreting():
        return 32, 32
    return (16 if M <= tile_configs.DECODE_MAX_M else 64), 64


def filled_without_launch(y: torch.Tensor, K: int, bias=None, *zeros: torch.Tensor) -> bool:
    """Whether a product over K needs no kernel, with its outputs filled when so: y is empty (no rows or
    columns to write), or K = 0, where y is the bias (or 0) and each of `zeros` is 0."""
    if y.numel() == 0:
        return True
    if K > 0:
        return False
    if bias is not None:
        y.copy_(bias.expand_as(y))
    else:
        y.zero_()
    for t in zeros:
        t.zero_()
    return True


def fused_outputs(x: torch.Tensor, N: int, R: int, lora_dtype: torch.dtype, bias=None) -> tuple:
    """(y (M, N) in x's dtype, xa (M, R) in lora_dtype, done) for a fused launcher over x (M, K): done when
    filled_without_launch has filled them, K = 0 included."""
    M, K = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=lora_dtype)
    return y, xa, filled_without_launch(y, K, bias, xa)


def tuned(kernel, key: list):
    """`kernel` autotuned over tile_configs.ALL, pruned to the list of each launch's target, dtypes and mode."""
    return triton.autotune(configs=tile_configs.ALL, key=key,
                           prune_configs_by={"early_config_prune": tile_configs.prune})(kernel)


def tile_count(M: int, N: int, meta: dict) -> int:
    """(BLOCK_M, BLOCK_N) tiles of an (M, N) output for a config's blocks."""
    return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])


def launch_tiles(kernel, tuned_kernel, M, N, args, flags, grid=None) -> None:
    """Run a kernel tiled over an (M, N) output: `tuned_kernel` on a GPU, `kernel` with INTERPRET_BLOCKS
    under the interpreter. One program per (BLOCK_M, BLOCK_N) tile unless `grid` (a function of the
    config) says otherwise."""
    grid = grid or (lambda meta: (tile_count(M, N, meta),))
    if interpreting():
        kernel[grid(INTERPRET_BLOCKS)](*args, **flags, **INTERPRET_BLOCKS)
    else:
        tuned_kernel[grid](*args, **flags)
