"""Split-K for decode-sized M: the fused LoRA matmul when reading W is the whole cost.

At M <= DECODE_MAX_M rows y = x @ W + s * (x @ A) @ B reads W (K * N elements) once and does little
else, and one program per (BLOCK_M, BLOCK_N) tile gives cdiv(N, BLOCK_N) programs: 64 for N = 4096 at
BLOCK_N = 64, under half of an H100's 132 SMs. So K is split over a second grid axis until the grid
covers tile_configs.DECODE_WAVES waves of the SMs (tile_configs.split_k), in two launches:

1. `_split_k_kernel`: program (tile, s) writes part[s] = x[:, Ks] @ W[Ks, tile] in fp32 for its K slice
   Ks; cdiv(M, BLOCK_M) more programs per slice write xa_part[s] = D[:, Ks] @ A[Ks] (D: x, masked for
   LoRA dropout). Both are tiles.k_loop over the slice's K range. Separate programs rather than a second loop in the first column block's: that block
   finished last, and the two loops in one program spilled 4-16 bytes on sm_90.
2. `_split_k_epilogue_kernel`: sums the slices in a fixed order (deterministic, no atomics), rounds xa to
   A's dtype as the unfused expression does, and adds s * xa @ B (masked for the backward's dropout) and
   the bias before the one rounding to y's dtype.

The partial sums cost splits * M * N * 8 bytes of traffic (written once, read once) beside W's
2 * K * N: 1 MB beside 32 MB for M = 8, K = N = 4096 and 4 slices. The mixed-adapter batches use the
first kernel too, without the shrink, and their own epilogue (kernels/batched.py).
"""
import torch
import triton
import triton.language as tl

from . import tile_configs
from .tiles import (INTERPRET_BLOCKS, dot_precision, grouped_tile, interpreting, k_loop, keep_scale, launch_tiles,
                    load_seed, rank_block, seed_pointer, store_tile, sum_splits, tile_count, tile_ptrs, tuned,
                    write_output)
from .torch_path import DROPOUT_INPUT, DROPOUT_OUTPUT

# Ranks above this take the prefill path at any M: the epilogue holds all of xa's rank in registers.
DECODE_MAX_R = 64
# The epilogue's column block: N / 64 programs, each summing a few (BLOCK_M, 64) fp32 slices.
EPILOGUE_BLOCK_N = 64
# The shrink programs' K step, whatever the config's BLOCK_K: the dropout keeps Philox state for each
# element of the x tile, and steps of 32 to 256 spilled 8-20 bytes on sm_90 (16 rows, 4 warps).
SHRINK_BLOCK_K = tl.constexpr(32)


@triton.jit
def _slice_product(x_ptr, w_ptr, part_ptr, M, N, k_begin, k_end, split, stride_xm, stride_xk, stride_wk, stride_wn,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """part[split] = x[:, k_begin:k_end] @ W[k_begin:k_end] on this program's (BLOCK_M, BLOCK_N) tile."""
    offs_m, offs_n, mask_m, mask_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n,
                 k_begin, k_end, stride_xm, stride_xk, stride_wk, stride_wn, PRECISION, BLOCK_K)
    store_tile(part_ptr, acc, split * M + offs_m, offs_n, mask_m, mask_n, N, 1)


@triton.jit
def _slice_shrink(x_ptr, a_ptr, xa_part_ptr, row_block, M, R, k_begin, k_end, split, seed, p,
                  stride_xm, stride_xk, stride_ak, stride_ar, mask_stride_row, mask_stride_col,
                  DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """xa_part[split] = D[:, k_begin:k_end] @ A[k_begin:k_end] on rows row_block * BLOCK_M + [0, BLOCK_M)."""
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_r = offs_m < M, offs_r < R
    xa = k_loop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, a_ptr, offs_m, offs_r, mask_m, mask_r,
                k_begin, k_end, stride_xm, stride_xk, stride_ak, stride_ar, LORA_PRECISION, SHRINK_BLOCK_K,
                DROPOUT, seed, p, mask_stride_row, mask_stride_col)
    store_tile(xa_part_ptr, xa, split * M + offs_m, offs_r, mask_m, mask_r, R, 1)


@triton.jit
def _split_k_kernel(
    x_ptr, w_ptr, a_ptr, part_ptr, xa_part_ptr, nsplit_ptr,
    M, N, K, R, seed_ptr, p, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, mask_stride_row, mask_stride_col,
    SHRINK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program (t, s) of grid (tiles + shrinks, splits), for K slice s: t < tiles writes part[s]
    (splits, M, N) fp32 on tile t; with SHRINK, t = tiles + i writes xa_part[s] (splits, M, R) fp32 on row
    block i, x masked when DROPOUT (DROPOUT_INPUT, mask index m * mask_stride_row + k * mask_stride_col).
    Program (0, 0) writes the number of slices to nsplit_ptr for the epilogue. M_BUCKET only keys the
    autotuner."""
    pid, split = tl.program_id(0), tl.program_id(1)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    if SHRINK:
        if pid >= tiles:
            _slice_shrink(x_ptr, a_ptr, xa_part_ptr, pid - tiles, M, R, k_begin, k_end, split,
                          load_seed(seed_ptr, DROPOUT), p,
                          stride_xm, stride_xk, stride_ak, stride_ar, mask_stride_row, mask_stride_col,
                          DROPOUT, LORA_PRECISION, BLOCK_M, BLOCK_R)
        else:
            _slice_product(x_ptr, w_ptr, part_ptr, M, N, k_begin, k_end, split, stride_xm, stride_xk, stride_wk,
                           stride_wn, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _slice_product(x_ptr, w_ptr, part_ptr, M, N, k_begin, k_end, split, stride_xm, stride_xk, stride_wk,
                       stride_wn, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    if (pid == 0) & (split == 0):
        tl.store(nsplit_ptr, tl.num_programs(1))


@triton.jit
def _split_k_epilogue_kernel(
    part_ptr, xa_part_ptr, nsplit_ptr, b_ptr, bias_ptr, y_ptr, xa_ptr,
    M, N, R, scale, seed_ptr, p,
    stride_br, stride_bn, stride_xam, stride_xar, stride_ym, stride_yn, mask_stride_row, mask_stride_col,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y tile = sum_s part[s] + s * (sum_s xa_part[s] -> A's dtype) @ B (+ bias); the first column block
    writes xa. BLOCK_R covers R. DROPOUT (DROPOUT_OUTPUT) masks the low-rank term at y's coordinates.
    grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_n, mask_r = offs_m < M, offs_n < N, offs_r < R
    acc = sum_splits(part_ptr, nsplit_ptr, offs_m, offs_n, mask_m, mask_n, M, N, BLOCK_M, BLOCK_N)
    xa = sum_splits(xa_part_ptr, nsplit_ptr, offs_m, offs_r, mask_m, mask_r, M, R, BLOCK_M, BLOCK_R)
    xa = xa.to(xa_ptr.dtype.element_ty)
    if tl.program_id(1) == 0:
        store_tile(xa_ptr, xa, offs_m, offs_r, mask_m, mask_r, stride_xam, stride_xar)
    b = tl.load(tile_ptrs(b_ptr, offs_r, offs_n, stride_br, stride_bn), mask=mask_r[:, None] & mask_n[None, :],
                other=0.0)
    lora = tl.dot(xa, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision=LORA_PRECISION)
    if DROPOUT:
        lora = lora * keep_scale(tl.load(seed_ptr), p, offs_m, offs_n, mask_stride_row, mask_stride_col)
    acc += scale * lora
    write_output(y_ptr, acc, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS)


_split_k_tuned = tuned(_split_k_kernel, key=["M_BUCKET", "N", "K", "R", "SHRINK", "DROPOUT", "PRECISION"])


def split_k_partials(x: torch.Tensor, w: torch.Tensor, a=None, dropout_p: float = 0.0, seed=None,
                     mask_strides=(0, 0)):
    """Run `_split_k_kernel` on x (M, K), w (K, N) and, given a (K, r), the shrink of D (x, masked with
    dropout_p > 0). Returns (part (splits, M, N) fp32, xa_part (splits, M, r) fp32 or None, nsplit (1,)
    int32), the first dimension sized for the largest split any config of this launch may choose."""
    M, K = x.shape
    N = w.shape[1]
    R = a.shape[1] if a is not None else 0
    target = tile_configs.gpu_target(x.device)
    precision = dot_precision(x.dtype)
    candidates = [INTERPRET_BLOCKS] if interpreting() else [
        c.kwargs for c in tile_configs.configs_for(target, x.dtype, x.dtype, precision, 0, M)]
    most = max(tile_configs.split_k(M, N, K, meta, target) for meta in candidates)
    part = torch.empty((most, M, N), device=x.device, dtype=torch.float32)
    xa_part = torch.empty((most, M, R), device=x.device, dtype=torch.float32) if a is not None else None
    nsplit = torch.empty(1, device=x.device, dtype=torch.int32)
    lora = a if a is not None else x  # an unread pointer without the shrink
    args = (
        x, w, lora, part, xa_part if a is not None else part, nsplit,
        M, N, K, R, seed_pointer(seed, x), float(dropout_p), triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), lora.stride(0), lora.stride(1), *mask_strides,
    )
    flags = dict(SHRINK=a is not None, DROPOUT=dropout_p > 0, PRECISION=precision,
                 LORA_PRECISION=dot_precision(lora.dtype), BLOCK_R=rank_block(R))

    def grid(meta):
        shrinks = triton.cdiv(M, meta["BLOCK_M"]) if a is not None else 0
        return tile_count(M, N, meta) + shrinks, tile_configs.split_k(M, N, K, meta, target)

    launch_tiles(_split_k_kernel, _split_k_tuned, M, N, args, flags, grid)
    return part, xa_part, nsplit


def launch_epilogue(kernel, M: int, N: int, R: int, args: tuple, flags: dict) -> None:
    """Run a split-K epilogue over the (M, N) output: (decode_block_m(M), EPILOGUE_BLOCK_N) tiles, 4 warps,
    BLOCK_R covering the rank R (at most DECODE_MAX_R)."""
    block_m = tile_configs.decode_block_m(M)
    kernel[(triton.cdiv(M, block_m), triton.cdiv(N, EPILOGUE_BLOCK_N))](
        *args, **flags, BLOCK_M=block_m, BLOCK_N=EPILOGUE_BLOCK_N, BLOCK_R=rank_block(R), num_warps=4)


def lora_decode_fwd(x, w, a, b, scale: float, bias, y, xa, dropout_p: float, seed, mode: int,
                    mask_strides) -> None:
    """lora_fwd (kernels/lora_triton.py) for M <= DECODE_MAX_M, R <= DECODE_MAX_R: fills y (M, N) and
    xa (M, r); mode is the dropout mode (NO_DROPOUT when dropout_p is 0)."""
    M, N, R = x.shape[0], w.shape[1], a.shape[1]
    part, xa_part, nsplit = split_k_partials(x, w, a, dropout_p if mode == DROPOUT_INPUT else 0.0, seed,
                                             mask_strides)
    launch_epilogue(
        _split_k_epilogue_kernel, M, N, R,
        (part, xa_part, nsplit, b, bias if bias is not None else y, y, xa,
         M, N, R, float(scale), seed_pointer(seed, x), dropout_p,
         b.stride(0), b.stride(1), xa.stride(0), xa.stride(1), y.stride(0), y.stride(1), *mask_strides),
        dict(HAS_BIAS=bias is not None, DROPOUT=mode == DROPOUT_OUTPUT, LORA_PRECISION=dot_precision(a.dtype)))
