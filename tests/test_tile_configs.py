"""kernels/tile_configs.py: the configs the autotuners may try and the split of decode grids.

Every config of every list runs here under the interpreter, through the launchers, on ragged shapes of a
few of its tiles (forward, backward with dropout, mixed-adapter batches), and equals the float64
reference: a GPU may pick any of them, so each has its masks and results proven, not just the interpreter's
default blocks. The compile report (tests/test_compile_report.py) proves that each compiles without
spilling."""
import pytest
import torch
import triton

from lowrank import kernels
from lowrank.kernels import reference, tile_configs, tiles
from lowrank.kernels.tile_configs import H100, Target
from lowrank.kernels.torch_path import DROPOUT_INPUT, DROPOUT_OUTPUT, NO_DROPOUT

from .kernel_checks import assert_matches, backend, keep_of, make, to64
from .test_batched import check_batched


def _cases(tables):
    """One case per block shape of each dtype and path: the interpreter runs blocks, not warps or stages."""
    cases = {}
    for table, dtype, decode in tables:
        for c in table:
            blocks = tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            cases.setdefault((blocks, dtype, decode), pytest.param(
                c, dtype, decode, id=f"{'decode' if decode else 'prefill'}-{'x'.join(map(str, blocks))}-"
                                     f"{str(dtype).replace('torch.', '')}"))
    return list(cases.values())


CASES = _cases([(tile_configs.PREFILL_16BIT + tile_configs.PREFILL_16BIT_WIDE, torch.bfloat16, False),
                (tile_configs.PREFILL_TF32 + tile_configs.PREFILL_TF32_WIDE, torch.float32, False),
                (tile_configs.PREFILL_FP32 + tile_configs.PREFILL_FP32_WIDE, torch.float32, False),
                (tile_configs.DECODE_16BIT, torch.bfloat16, True),
                (tile_configs.DECODE_32BIT, torch.float32, True)])


@pytest.fixture
def blocks(monkeypatch):
    """Run the interpreter with the blocks of a given config."""
    def use(config):
        for key, value in config.kwargs.items():
            monkeypatch.setitem(tiles.INTERPRET_BLOCKS, key, value)
    return use


def _shape(config, decode):
    """(M, N, K): two tiles of rows (prefill) or M within the config's decode bucket, two ragged column
    tiles, and two K blocks (two K slices on the decode path)."""
    k = config.kwargs
    M = k["BLOCK_M"] - 3 if decode else k["BLOCK_M"] + 9
    return M, k["BLOCK_N"] + 7, k["BLOCK_K"] + 5


@pytest.mark.parametrize("config,dtype,decode", CASES)
def test_every_config_runs_forward_and_backward_with_dropout_as_the_reference(config, dtype, decode, blocks):
    M, N, K = _shape(config, decode)
    r, s, p, seed = 19, 1.5, 0.25, 11
    keep = keep_of(M, K, p, seed, "triton")  # with the default blocks: a config's mask must be the same
    gen = torch.Generator().manual_seed(M * N + K)
    x = make((M, K), "transposed", dtype, gen, "cpu")
    W = make((K, N), "transposed", dtype, gen, "cpu") / K ** 0.5
    A = make((K, r), "strided", dtype, gen, "cpu") / K ** 0.5
    B = make((r, N), "contiguous", dtype, gen, "cpu") / r ** 0.5
    bias = torch.randn(N, generator=gen).to(dtype)
    dY = torch.randn(M, N, generator=gen).to(dtype)
    blocks(config)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    with backend("triton"):
        y = kernels.lora_matmul(leaves[0], W, leaves[1], leaves[2], s, bias, dropout_p=p, seed=seed)
        y.backward(dY)
    lowp = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    d = lowp[0] * torch.from_numpy(keep).to(dtype)
    lowp_y = x @ W + bias + s * (d @ lowp[1]) @ lowp[2]
    lowp_y.backward(dY)
    args64 = (to64(x), to64(W), to64(A), to64(B), s)
    assert_matches("y", y, reference.lora_forward(*args64, to64(bias), keep), lowp_y, dtype)
    for name, got, ref, low in zip(("dX", "dA", "dB"), (t.grad for t in leaves),
                                   reference.lora_backward(*args64, to64(dY), keep), (t.grad for t in lowp)):
        assert_matches(name, got, ref, low, dtype)


@pytest.mark.parametrize("config,dtype,decode", CASES)
def test_every_config_runs_mixed_adapter_batches_as_the_reference(config, dtype, decode, blocks):
    M, N, K = _shape(config, decode)
    blocks(config)
    check_batched(dict(M=M, K=K, N=N, n=3, r_max=9, ranks=[9, 4, 1], base_rows=0.3, x_layout="strided",
                       w_layout="transposed", b_transposed=True, bias=True, seed=M + N + K), dtype, "cpu", "triton")


TARGETS = [Target(80, 108), H100]
DTYPES = [(torch.float32, torch.float32, "ieee"), (torch.float32, torch.float32, "tf32"),
          (torch.bfloat16, torch.bfloat16, "ieee"), (torch.float16, torch.float16, "ieee"),
          (torch.bfloat16, torch.float32, "ieee")]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.capability}")
def test_every_launch_has_configs_and_every_config_is_the_autotuners(target):
    for x_dtype, lora_dtype, precision in DTYPES:
        for mode in (NO_DROPOUT, DROPOUT_INPUT, DROPOUT_OUTPUT):
            for M in (1, 16, 17, 33, 64, 65, 8192):
                configs = tile_configs.configs_for(target, x_dtype, lora_dtype, precision, mode, M)
                assert configs and all(c in tile_configs.ALL for c in configs)
                if M <= tile_configs.DECODE_MAX_M:  # the decode bucket: BLOCK_M covers M, no more
                    assert {c.kwargs["BLOCK_M"] for c in configs} == {max(16, triton.next_power_of_2(M))}


def test_wide_launches_take_the_lists_without_the_large_tiles():
    def blocks_n(x_dtype, lora_dtype, precision, mode, batched=False):
        configs = tile_configs.configs_for(H100, x_dtype, lora_dtype, precision, mode, 8192, batched)
        return {c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs}
    bf16, fp32 = torch.bfloat16, torch.float32
    assert max(blocks_n(bf16, bf16, "ieee", NO_DROPOUT)) == 128 * 256
    assert max(blocks_n(fp32, fp32, "tf32", DROPOUT_INPUT)) == 128 * 128
    for wide in (blocks_n(bf16, fp32, "ieee", NO_DROPOUT), blocks_n(bf16, bf16, "ieee", DROPOUT_OUTPUT),
                 blocks_n(bf16, bf16, "ieee", NO_DROPOUT, batched=True), blocks_n(fp32, fp32, "tf32", DROPOUT_OUTPUT),
                 blocks_n(fp32, fp32, "tf32", NO_DROPOUT, batched=True)):
        assert max(wide) == 128 * 64
    # fp32 adapters on fp32 inputs are the plain case: nothing wider than the x tile.
    assert blocks_n(fp32, fp32, "tf32", NO_DROPOUT) == blocks_n(fp32, fp32, "tf32", DROPOUT_INPUT)


def test_prune_reads_the_launch_from_its_arguments():
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype, device="meta")
    single = {"x_ptr": meta(8192, 64), "b_ptr": meta(16, 64, dtype=torch.float32), "M": 8192}
    batched = {"x_ptr": meta(8192, 64), "b_ptr": meta(3, 16, 64), "idx_ptr": meta(8192, dtype=torch.int32),
               "M": 8192}
    assert tile_configs.prune(tile_configs.ALL, single, PRECISION="ieee", DROPOUT=NO_DROPOUT) == \
        tile_configs.PREFILL_16BIT_WIDE
    assert tile_configs.prune(tile_configs.ALL, batched, PRECISION="ieee") == tile_configs.PREFILL_16BIT_WIDE
    decode = {"x_ptr": meta(8, 64), "M": 8}  # the split-K kernel has no B
    assert {c.kwargs["BLOCK_M"] for c in tile_configs.prune(tile_configs.ALL, decode, PRECISION="ieee")} == {16}


@pytest.mark.parametrize("M", [1, 8, 64])
def test_decode_grids_cover_two_programs_per_sm_with_no_empty_slice(M):
    for target in TARGETS:
        for config in tile_configs.configs_for(target, torch.bfloat16, torch.bfloat16, "ieee", NO_DROPOUT, M):
            meta = config.kwargs
            tiles_ = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(4096, meta["BLOCK_N"])
            splits = tile_configs.split_k(M, 4096, 4096, meta, target)
            assert tiles_ * splits >= tile_configs.DECODE_WAVES * target.sms, (target, meta, splits)
            assert splits <= tile_configs.MAX_SPLIT_K
    for K in (1, 5, 64, 300, 1000, 4097):  # the kernel's slice: cdiv(k_blocks, splits) blocks, never empty
        meta = {"BLOCK_M": 16, "BLOCK_N": 4096, "BLOCK_K": 64}
        splits = tile_configs.split_k(M, 4096, K, meta, H100)
        k_blocks = triton.cdiv(K, 64)
        assert 1 <= splits <= min(k_blocks, tile_configs.MAX_SPLIT_K)
        assert (splits - 1) * triton.cdiv(k_blocks, splits) < k_blocks


def test_assume_target_nests_and_restores():
    cpu = torch.device("cpu")
    assert tile_configs.gpu_target(cpu) == H100
    with tile_configs.assume_target(TARGETS[0]):
        assert tile_configs.gpu_target(cpu) == TARGETS[0]
        with tile_configs.assume_target(H100):
            assert tile_configs.gpu_target(cpu) == H100
        assert tile_configs.gpu_target(cpu) == TARGETS[0]
    assert tile_configs.gpu_target(cpu) == H100
