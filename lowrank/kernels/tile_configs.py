"""The tile configs each autotuner may try, by target, dtype and path, and the split of decode grids.

Every config listed here compiles for its target without spilling and within the per-CTA shared-memory
limit (`python -m lowrank.kernels.compile_report` checks each one, and CI runs it). The autotuners are
given the union of the lists and `prune`, which keeps the list of the launch's target, dtypes and mode;
the report prunes with the same function, for each target it compiles for.

Prefill (M > DECODE_MAX_M): one program per (BLOCK_M, BLOCK_N) tile of y, the whole K loop in it.
16-bit tiles run on tensor cores (wgmma on sm_90 from BLOCK_M = 64). IEEE fp32 runs on the FMA units,
whose (BLOCK_M, BLOCK_N) accumulator shares the registers with the operands: its tiles are smaller,
with a shallow BLOCK_K so that the stages fit in shared memory. Output-masked dropout (the backward's
dX) keeps Philox temporaries beside the accumulator, fp32 adapters widen the low-rank operands and the
batched kernel keeps per-row adapter ids and scales: these "wide" launches take the _WIDE lists, which
leave out the 128x256 and 128x128 tiles (they spill there) and give 128-row tiles 8 warps (IEEE fp32:
8 warps on its 64x64 tile).

Decode (M <= DECODE_MAX_M): the product is bound by reading W once, and a grid of one program per
column block has cdiv(N, BLOCK_N) programs, under one wave of an H100's 132 SMs for N = 4096. The
decode kernel splits K over a second grid axis (`split_k`) until the grid covers DECODE_WAVES waves.
"""
import contextlib
from dataclasses import dataclass

import torch
import triton

from .torch_path import DROPOUT_OUTPUT

# Rows at or below which the launchers take the split-K decode path.
DECODE_MAX_M = 64
# Waves of programs over the SMs the decode grid is split to cover, and the most K slices it may have.
DECODE_WAVES = 2
MAX_SPLIT_K = 16


@dataclass(frozen=True)
class Target:
    """What the configs depend on: compute capability (80, 90, ...) and the number of SMs."""

    capability: int
    sms: int


H100 = Target(90, 132)
_assumed = []


def gpu_target(device: torch.device) -> Target:
    """The target programs launched on `device` run on: the GPU's own, the one `assume_target` sets,
    or an H100 for the interpreter and meta tensors."""
    if _assumed:
        return _assumed[-1]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Target(10 * major + minor, torch.cuda.get_device_properties(device).multi_processor_count)
    return H100


@contextlib.contextmanager
def assume_target(target: Target):
    """Inside, launchers and `prune` choose configs and grids for `target`: how the compile report asks
    what a launch would run on an A100 or an H100 with no GPU here."""
    _assumed.append(target)
    try:
        yield
    finally:
        _assumed.pop()


def _configs(rows) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8 if m >= 64 else 1},
                          num_warps=w, num_stages=s) for m, n, k, w, s in rows]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
PREFILL_16BIT = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
                          (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)])
PREFILL_16BIT_WIDE = _configs([(128, 64, 64, 8, 4), (64, 128, 64, 8, 4), (64, 64, 64, 4, 4)])
PREFILL_TF32 = _configs([(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)])
PREFILL_TF32_WIDE = _configs([(128, 64, 32, 8, 4), (64, 128, 32, 8, 4), (64, 64, 32, 4, 4)])
PREFILL_FP32 = _configs([(64, 64, 32, 4, 3), (128, 64, 16, 8, 3), (32, 64, 32, 4, 3)])
PREFILL_FP32_WIDE = _configs([(64, 64, 32, 8, 3), (128, 64, 16, 8, 3), (32, 64, 32, 4, 3)])
# Decode: 16-row tiles on sm_90 spilled a few bytes in some modes with deeper K blocks or 4 warps on
# 128 columns (compile report, issue 14); these are the ones clean in every mode on sm_80 and sm_90.
DECODE_16BIT = _configs([(16, 64, 64, 4, 4), (16, 128, 64, 2, 4), (32, 64, 64, 8, 4), (32, 32, 64, 4, 4),
                         (64, 64, 64, 4, 4)])
DECODE_32BIT = _configs([(16, 64, 32, 4, 4), (32, 64, 32, 8, 4), (32, 32, 32, 4, 4), (64, 64, 32, 4, 4)])
ALL = (PREFILL_16BIT + PREFILL_16BIT_WIDE + PREFILL_TF32 + PREFILL_TF32_WIDE + PREFILL_FP32 + PREFILL_FP32_WIDE
       + DECODE_16BIT + DECODE_32BIT)


def decode_block_m(M: int) -> int:
    return min(DECODE_MAX_M, max(16, triton.next_power_of_2(M)))


def configs_for(target: Target, x_dtype: torch.dtype, lora_dtype: torch.dtype, precision: str,
                dropout: int, M: int, batched: bool = False) -> list:
    """The configs a launch may try: x_dtype is x's and W's, lora_dtype A's and B's (the adapters' or, for
    mixed batches, x's), precision the main dot's ("ieee" or "tf32"), dropout the kernel's mode, batched
    whether it is the mixed-adapter kernel."""
    if M <= DECODE_MAX_M:
        table = DECODE_32BIT if x_dtype == torch.float32 else DECODE_16BIT
        return [c for c in table if c.kwargs["BLOCK_M"] == decode_block_m(M)]
    # Wide: more than the accumulator and the operand tiles live in the K loop (the output dropout's
    # Philox state, fp32 adapter tiles, the batched kernel's per-row adapter ids and scales).
    wide = batched or dropout == DROPOUT_OUTPUT or (x_dtype != torch.float32 and lora_dtype == torch.float32)
    if x_dtype != torch.float32:
        return PREFILL_16BIT_WIDE if wide else PREFILL_16BIT
    if precision == "tf32":
        return PREFILL_TF32_WIDE if wide else PREFILL_TF32
    return PREFILL_FP32_WIDE if wide else PREFILL_FP32


def prune(configs, named_args, **kwargs) -> list:
    """triton.autotune's early_config_prune: the list `configs_for` gives this launch."""
    x = named_args["x_ptr"]
    lora = named_args.get("b_ptr", x)  # the split-K kernel has none: decode configs do not depend on it
    return configs_for(gpu_target(x.device), x.dtype, lora.dtype, kwargs["PRECISION"], kwargs.get("DROPOUT", 0),
                       named_args["M"], batched="idx_ptr" in named_args)


def split_k(M: int, N: int, K: int, meta: dict, target: Target) -> int:
    """K slices for a decode grid of cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) tiles: enough for DECODE_WAVES
    programs per SM of the target, at most MAX_SPLIT_K and at most one per BLOCK_K block, and none empty
    when the kernel gives each slice cdiv(k_blocks, splits) blocks."""
    tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
    k_blocks = triton.cdiv(K, meta["BLOCK_K"])
    most = min(MAX_SPLIT_K, k_blocks)
    wanted = max(1, min(most, triton.cdiv(DECODE_WAVES * target.sms, tiles)))
    for splits in [*range(wanted, most + 1), *range(wanted - 1, 0, -1)]:
        if (splits - 1) * triton.cdiv(k_blocks, splits) < k_blocks:
            return splits
    return 1
