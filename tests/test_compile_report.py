"""kernels/compile_report.py, the GPU binaries built without a GPU: the launches come from the real launchers
(every kernel, call site, dtype and weight shape), each distinct binary compiles once for sm_80 and sm_90
through triton's own path, and a launch's line carries its grid and the binary's registers, spills, shared
memory, residency and tensor-core instruction.

It runs in a subprocess: the report needs triton's compiler, and these tests' process imported triton in
interpreter mode."""
import json
import os
import re
import subprocess
import sys

import pytest

from lowrank.kernels import tile_configs
from lowrank.kernels.compile_report import DEVICES, DTYPES, SHAPES, Binary, _ctas_per_sm, _ptxas_usage


def run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOWRANK_FORCE_TRITON")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_launches_are_recorded_from_every_launcher_site_and_dtype():
    result = run_python(
        "import json\n"
        "from lowrank.kernels.compile_report import record_launches\n"
        "ls = record_launches()\n"
        "print(json.dumps(sorted({(l.site, l.dtype, l.kernel.__name__, len(l.configs)) for l in ls})))\n"
        "sizes = lambda l: dict(zip(l.kernel.arg_names, l.args))\n"
        "print(json.dumps(sorted({(l.site, sizes(l)['K'], sizes(l)['N']) for l in ls\n"
        "                         if {'K', 'N'} <= set(l.kernel.arg_names)})))\n")  # the W-reading kernels
    assert result.returncode == 0, result.stderr[-2000:]
    rows, shapes = result.stdout.splitlines()
    seen = {tuple(row) for row in json.loads(rows)}
    kernels = {k for _, _, k, _ in seen}
    assert kernels == {"_lora_fwd_kernel", "_shrink_kernel", "_split_k_kernel", "_split_k_epilogue_kernel",
                       "_batched_fwd_kernel", "_batched_shrink_kernel", "_batched_split_k_epilogue_kernel"}
    sites = {s for s, _, _, _ in seen}
    calls = {s.split("@")[0] for s in sites}
    assert {f"{s}-{p}" for s in ("fwd", "dx", "batched") for p in ("prefill", "decode")} <= calls
    assert {"da-prefill-dropout", "fwd-prefill-dropout", "dx-decode-dropout"} <= calls
    assert sites == {f"{c}@{shape}" for c in calls for shape in ("q_o", "gate_up", "down")}  # every site, every shape
    # The kernels that read W run over its (K, N) in the forward and batches, over (N, K) in the backward's dX.
    recorded = {tuple(row) for row in json.loads(shapes)}
    assert {site.split("@")[0] for site, _, _ in recorded} == {c for c in calls if not c.startswith("da")}
    for site, k, n in recorded:
        call, shape = site.split("@")
        assert (k, n) == (SHAPES[shape][::-1] if call.startswith("dx") else SHAPES[shape]), site
    assert {d for _, d, _, _ in seen} == {"fp32", "tf32", "fp16", "bf16", "bf16+fp32-lora", "fp16+fp32-lora"}
    # The autotuned kernels bring the configs the autotuner may try after its pruning: tile_configs' list.
    configs = {(s, d, k): n for s, d, k, n in seen}
    assert configs["fwd-prefill@q_o", "bf16", "_lora_fwd_kernel"] == len(tile_configs.PREFILL_16BIT)
    assert configs["dx-prefill-dropout@down", "bf16", "_lora_fwd_kernel"] == len(tile_configs.PREFILL_16BIT_WIDE)
    assert configs["batched-prefill@gate_up", "fp32", "_batched_fwd_kernel"] == len(tile_configs.PREFILL_FP32_WIDE)
    decode = sum(c.kwargs["BLOCK_M"] == 16 for c in tile_configs.DECODE_16BIT)
    assert configs["fwd-decode@q_o", "bf16", "_split_k_kernel"] == decode
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
    launched, distinct = map(int, re.search(r"^(\d+) launch configs \((\d+) distinct", result.stdout, re.M).groups())
    assert launched == len(lines) == 3 * distinct  # the three shapes specialise alike: one binary for three
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
        if (target, site.split("@")[0], dtype, kernel) == ("sm_90", "fwd-prefill", "bf16", "_lora_fwd_kernel"):
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
    # A split-K decode grid must cover DECODE_WAVES programs per SM of the target: one program fewer does not.
    enough = tile_configs.DECODE_WAVES * DEVICES[90].sms
    decode = Binary(**{**clean.__dict__, "kernel": "_split_k_kernel", "grid": enough})
    assert decode.problems() == []
    assert "decode grid under" in Binary(**{**decode.__dict__, "grid": enough - 1}).problems()[0]


def test_each_distinct_binary_is_compiled_once_and_each_launch_keeps_its_grid():
    """The three shapes specialise alike (every size a multiple of 16), so gate/up and down add launches but
    no binary; their grids are their own. The compile is stubbed (the CI-subset test above compiles for
    real): each call leaves a line on stderr."""
    result = run_python(
        "import sys\n"
        "from lowrank.kernels import compile_report as cr\n"
        "def compile_binary(launch, config):\n"
        "    print('compile', launch.site, file=sys.stderr, flush=True)\n"
        "    return cr.Binary(launch.site, launch.dtype, launch.kernel.__name__, cr._config_name(config),\n"
        "                     launch.target, regs=64, shared=1024, ctas_per_sm=2, tensor_cores='mma')\n"
        "cr.compile_binary = compile_binary\n"
        "sys.exit(cr.main(['--targets', '90', '--dtypes', 'bf16', '--jobs', '1']))\n", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    compiled = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("compile ")]
    lines = [re.match(r"sm_90 (\S+) +bf16 +(\S+) +(.+?) +grid +(\d+) .* waves +([\d.]+)", line).groups()
             for line in result.stdout.splitlines() if line.startswith("sm_")]
    assert len(lines) == 3 * len(compiled) and {site.split("@")[1] for site in compiled} == {"q_o"}
    assert re.search(rf"^{len(lines)} launch configs \({len(compiled)} distinct binaries\), {len(lines)} clean",
                     result.stdout, re.M), result.stdout[-500:]
    grid = {(site, kernel, config): int(programs) for site, kernel, config, programs, _ in lines}
    for *_, programs, waves in lines:  # the stub's 2 CTAs per SM, over this launch's own grid
        assert abs(float(waves) - int(programs) / (2 * DEVICES[90].sms)) < 0.006
    big = "_lora_fwd_kernel", "128x256x64 w8 s3"
    square, gate_up, down = (grid[(f"fwd-prefill@{s}",) + big] for s in SHAPES)
    # Prefill: gate/up has 3.5x the square shape's output tiles; down has its tiles (a 3.5x longer K loop).
    assert gate_up == 3.5 * square == 3584 and down == square
    # Decode: split-K re-splits each shape's tiles to at least DECODE_WAVES programs per SM.
    H100 = tile_configs.H100
    for shape, (k, n) in SHAPES.items():
        for config in tile_configs.DECODE_16BIT:
            meta = config.kwargs
            if meta["BLOCK_M"] != 16:
                continue
            expected = (-(-n // meta["BLOCK_N"]) + 1) * tile_configs.split_k(8, n, k, meta, H100)
            name = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
            assert grid[f"fwd-decode@{shape}", "_split_k_kernel", name] == expected >= 2 * H100.sms, shape
    assert grid["fwd-decode@gate_up", "_split_k_kernel", "16x64x64 w4 s4"] == 450  # 224 tiles, 2 slices
    assert grid["fwd-decode@down", "_split_k_epilogue_kernel", "fixed"] == 4096 // 64
    # dA = D.T @ g runs the shrink over x.T: down's K = 14336 rows are 3.5x the square shape's programs.
    da = {s: grid[f"da-prefill-dropout@{s}", "_shrink_kernel", "fixed"] for s in SHAPES}
    assert da["down"] == 3.5 * da["q_o"] == 3.5 * da["gate_up"]
