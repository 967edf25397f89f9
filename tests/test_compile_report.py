"""kernels/compile_report.py, the GPU binaries built without a GPU: the launches come from the real launchers
(every kernel, call site and dtype), each compiles for sm_80 and sm_90 through triton's own path, and a
binary's line carries registers, spills, shared memory, residency and the tensor-core instruction.

It runs in a subprocess: the report needs triton's compiler, and these tests' process imported triton in
interpreter mode."""
import json
import os
import re
import subprocess
import sys

import pytest

from lowrank.kernels import tile_configs
from lowrank.kernels.compile_report import DEVICES, DTYPES, Binary, _ctas_per_sm, _ptxas_usage


def run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOWRANK_FORCE_TRITON")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_launches_are_recorded_from_every_launcher_site_and_dtype():
    result = run_python(
        "import json\n"
        "from lowrank.kernels.compile_report import record_launches\n"
        "ls = record_launches()\n"
        "print(json.dumps(sorted({(l.site, l.dtype, l.kernel.__name__, len(l.configs)) for l in ls})))\n")
    assert result.returncode == 0, result.stderr[-2000:]
    seen = {tuple(row) for row in json.loads(result.stdout)}
    kernels = {k for _, _, k, _ in seen}
    assert kernels == {"_lora_fwd_kernel", "_shrink_kernel", "_split_k_kernel", "_split_k_epilogue_kernel",
                       "_batched_fwd_kernel", "_batched_shrink_kernel", "_batched_split_k_epilogue_kernel"}
    sites = {s for s, _, _, _ in seen}
    assert {f"{s}-{p}" for s in ("fwd", "dx", "batched") for p in ("prefill", "decode")} <= sites
    assert {"da-prefill-dropout", "fwd-prefill-dropout", "dx-decode-dropout"} <= sites
    for shape in ("gate_up", "down"):  # Llama's MLP shapes (K, N) = (4096, 14336) and (14336, 4096), every site
        assert {f"{site}@{shape}" for site in sites if "@" not in site} <= sites
    assert {d for _, d, _, _ in seen} == {"fp32", "tf32", "fp16", "bf16", "bf16+fp32-lora", "fp16+fp32-lora"}
    # The autotuned kernels bring the configs the autotuner may try after its pruning: tile_configs' list.
    configs = {(s, d, k): n for s, d, k, n in seen}
    assert configs["fwd-prefill", "bf16", "_lora_fwd_kernel"] == len(tile_configs.PREFILL_16BIT)
    assert configs["dx-prefill-dropout", "bf16", "_lora_fwd_kernel"] == len(tile_configs.PREFILL_16BIT_WIDE)
    assert configs["batched-prefill", "fp32", "_batched_fwd_kernel"] == len(tile_configs.PREFILL_FP32_WIDE)
    decode = sum(c.kwargs["BLOCK_M"] == 16 for c in tile_configs.DECODE_16BIT)
    assert configs["fwd-decode", "bf16", "_split_k_kernel"] == decode
    assert "_lora_fwd_kernel" not in {k for s, _, k, _ in seen if "decode" in s}


def test_every_kernel_dtype_and_target_compiles_clean_with_triton_s_own_flags():
    """CI's subset of the full report (bench/RESULTS.md): each launch with the first config its autotuner
    may try, so every kernel, call site, dtype and target; the report exits 1 on any problem."""
    result = run_python(
        "import sys\n"
        "from lowrank.kernels.compile_report import main\n"
        "sys.exit(main(['--first-config']))\n", timeout=1200)
    problems = [line for line in result.stdout.splitlines() if "<--" in line or "ERROR" in line]
    assert result.returncode == 0, (problems or [result.stdout[-2000:]]) + [result.stderr[-2000:]]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_")]
    built = {tuple(line.split()[:4]) for line in lines}  # (target, site, dtype, kernel)
    kernels = {k for _, _, _, k in built}
    assert len(kernels) == 7 and {d for _, _, d, _ in built} == {d[0] for d in DTYPES}
    for target in ("sm_80", "sm_90"):
        for dtype, x_dtype, lora_dtype, _ in DTYPES:
            expected = {k for k in kernels if x_dtype == lora_dtype or not k.startswith("_batched")}
            assert {k for t, _, d, k in built if (t, d) == (target, dtype)} == expected, (target, dtype)
    for line in lines:
        target, site, dtype, kernel = line.split()[:4]
        assert re.search(r" regs +\d+ spill +0 shared +\d+ CTAs/SM +[1-9]", line), line
        if (target, site, dtype, kernel) == ("sm_90", "fwd-prefill", "bf16", "_lora_fwd_kernel"):
            assert line.rstrip().endswith("wgmma"), line  # 16-bit prefill on Hopper: warp-group MMA
        if kernel == "_split_k_kernel":  # decode grids: at least DECODE_WAVES programs per SM
            assert float(re.search(r"\(\s*([\d.]+)/SM\)", line).group(1)) >= tile_configs.DECODE_WAVES, line


def test_ptxas_log_parsing_and_residency():
    log = ("ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized\n"
           "    1024 bytes stack frame, 2076 bytes spill stores, 1568 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes cumulative stack size\n")
    assert _ptxas_usage(log) == (255, 2076, True)
    assert _ptxas_usage("ptxas info    : Used 64 registers, used 1 barriers\n") == (64, 0, False)
    with pytest.raises(RuntimeError, match="no register count"):
        _ptxas_usage("")
    # 8 warps at 255 registers: 65536 / (256 * 32 * 8) = 1 CTA; shared memory can bind first.
    assert _ctas_per_sm(DEVICES[90], 255, 8, 1024) == 1
    assert _ctas_per_sm(DEVICES[90], 64, 4, 61440) == 3
    assert _ctas_per_sm(DEVICES[80], 32, 4, 0) == 16  # threads: 2048 / 128


def test_a_binary_with_spills_or_too_much_shared_memory_is_a_problem():
    clean = Binary("fwd-prefill", "bf16", "_lora_fwd_kernel", "64x128x64 w4 s4", 90, grid=4096, regs=160,
                   shared=98304, ctas_per_sm=2, tensor_cores="wgmma")
    assert clean.problems() == [] and "<--" not in clean.line()
    spilled = Binary(**{**clean.__dict__, "spill": 2076})
    too_big = Binary(**{**clean.__dict__, "target": 80, "shared": 200 * 1024})
    assert "2076 spill bytes" in spilled.problems()[0] and "cannot launch" in too_big.problems()[0]
    assert Binary(**{**clean.__dict__, "error": "CompilationError: x"}).problems() == ["compile error: CompilationError: x"]


def test_llama_shapes_share_binaries_but_keep_their_own_grids():
    """gate/up and down specialise like the square shape (every size a multiple of 16): one binary each,
    but gate/up's N = 14336 gives 3.5x the output tiles of the prefill grid."""
    result = run_python(
        "import sys\n"
        "from lowrank.kernels.compile_report import main\n"
        "sys.exit(main(['--targets', '90', '--dtypes', 'bf16', '--sites', 'fwd-prefill', '--first-config', '--jobs', '1']))\n",
        timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "12 launch configs (4 distinct binaries)" in result.stdout
    grids = {tuple(line.split()[1:4:2]): int(re.search(r"grid +(\d+)", line).group(1))
             for line in result.stdout.splitlines() if line.startswith("sm_")}
    assert grids["fwd-prefill@gate_up", "_lora_fwd_kernel"] == 3.5 * grids["fwd-prefill", "_lora_fwd_kernel"]
    assert grids["fwd-prefill@down", "_lora_fwd_kernel"] == grids["fwd-prefill", "_lora_fwd_kernel"]
