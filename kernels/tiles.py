"""What the Triton kernels share: tile addressing, LoRA dropout's mask, dot precision, and the launch of
a kernel tiled over an (M, N) output.

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


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 switch, as torch.matmul does; 16-bit types use tensor cores."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def rank_block(R: int) -> int:
    """BLOCK_R for reading xa or A in rank slices: R rounded up to a power of 2, within 16..64."""
    return min(64, max(16, triton.next_power_of_2(R)))


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
