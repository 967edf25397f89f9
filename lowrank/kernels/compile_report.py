"""What a GPU would run, built without one: every Triton binary the launchers can ask for, compiled for
Ampere (sm_80) and Hopper (sm_90) on this machine.

    python -m lowrank.kernels.compile_report [--targets 80,90] [--sites ...] [--dtypes ...] [--shapes ...]
                                             [--first-config] [--jobs N] [--no-fail]

The launches come from the real launchers (lora_fwd, shrink, dropped_t_matmul, lora_batched_fwd) called on
meta tensors of the shapes below (three weight shapes, SHAPES), once per target under
tile_configs.assume_target, while triton's launch methods are recorded instead of run; each recorded launch
is then compiled as triton's runtime would compile it (its binder's argument specialization, `_pack_args`,
`triton.compile` for the target), once per autotune config the launcher's autotuner can try there (its own
pruning, tile_configs.prune). Triton specialises integer arguments only by divisibility by 16 and equality
to 1, so launches of different shapes mostly ask for the same binary: each distinct one (`compile_key`) is
compiled once, and every launch keeps its own grid.

One line per launch and config: call site@shape, kernel, dtype, config, grid (and programs per SM: 132 SMs
on H100/H200, 108 on A100), registers, spill bytes, shared memory, resident CTAs per SM and waves of them,
and the tensor-core instruction the PTX uses (wgmma, mma or none; "serialized" where ptxas serialises wgmma
for want of registers). Registers and spill bytes come from the `ptxas -v` log of triton's own compile, so
from the flags it really builds with. Exit code 1 on a compile error, any spilled bytes, shared memory
above the per-CTA limit, or a decode grid with fewer than tile_configs.DECODE_WAVES programs per SM.
"""
import argparse
import contextlib
import io
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import batched, lora_triton, tile_configs, tiles
from .torch_path import DROPOUT_OUTPUT


@dataclass(frozen=True)
class Device:
    """What bounds residency on one SM of a target, and the per-CTA shared-memory limit."""

    sms: int
    smem_per_sm: int
    smem_per_cta: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32


DEVICES = {80: Device(sms=108, smem_per_sm=164 * 1024, smem_per_cta=163 * 1024),  # A100
           90: Device(sms=132, smem_per_sm=228 * 1024, smem_per_cta=227 * 1024)}  # H100 / H200 SXM

# (name, x/W dtype, A/B dtype, allow_tf32): the dtypes users run, fp32 both ways.
DTYPES = [("fp32", torch.float32, torch.float32, False), ("tf32", torch.float32, torch.float32, True),
          ("fp16", torch.float16, torch.float16, False), ("bf16", torch.bfloat16, torch.bfloat16, False),
          ("bf16+fp32-lora", torch.bfloat16, torch.float32, False),
          ("fp16+fp32-lora", torch.float16, torch.float32, False)]
# (K, N) of the weights, by the Llama-3-8B / Mistral-7B linears they are: q_proj and o_proj (4096 -> 4096),
# the MLP's gate_proj and up_proj (4096 -> 14336) and down_proj (14336 -> 4096). Sites end in @name.
SHAPES = {"q_o": (4096, 4096), "gate_up": (4096, 14336), "down": (14336, 4096)}
R = 16
PREFILL_M, DECODE_M, ADAPTERS = 8192, 8, 4


@dataclass
class Launch:
    """One recorded kernel launch: where it came from and what it was called with."""

    site: str
    dtype: str
    target: int
    kernel: JITFunction
    configs: list  # the configs the autotuner may try on the target, or [None] for a plain launch
    grid: object
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording(launches: list, site: str, dtype: str, target: int):
    """Record every triton launch made inside instead of running it, with the configs an autotuner would
    try after its pruning."""
    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(site, dtype, target, self, [None], grid, args, kwargs))

    def tuned_run(self, *args, grid, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        launches.append(Launch(site, dtype, target, self.fn, self.prune_configs(kwargs), grid, args, kwargs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def record_launches(targets=(80, 90), sites=None, dtypes=None, shapes=None) -> list:
    """Launches of every call site for every dtype, weight shape and target (sites, dtypes and shapes filtered by
    name when given)."""
    if not isinstance(tiles.k_loop, JITFunction):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: the interpreter builds no binaries; "
                           "run the report in a process without it")
    launches = []
    for target in targets:
        with tile_configs.assume_target(tile_configs.Target(target, DEVICES[target].sms)):
            for shape, (K, N) in SHAPES.items():
                if not shapes or shape in shapes:
                    _record_target(launches, target, sites, dtypes, K, N, f"@{shape}")
    return launches


def _record_target(launches: list, target: int, sites, dtypes, K: int, N: int, suffix: str) -> None:
    for name, dtype, lora_dtype, tf32 in DTYPES:
        if dtypes and name not in dtypes:
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for phase, M in (("prefill", PREFILL_M), ("decode", DECODE_M)):
            x, dy = _meta(M, K, dtype=dtype), _meta(M, N, dtype=dtype)
            w = _meta(N, K, dtype=dtype).T  # an nn.Linear weight seen as (K, N)
            a, b = _meta(R, K, dtype=lora_dtype).T, _meta(N, R, dtype=lora_dtype).T  # PEFT's factors
            bias, seed = _meta(N, dtype=dtype), _meta(1, dtype=torch.int64)
            calls = {
                f"fwd-{phase}": lambda: lora_triton.lora_fwd(x, w, a, b, 2.0, bias),
                f"fwd-{phase}-dropout": lambda: lora_triton.lora_fwd(x, w, a, b, 2.0, bias, 0.1, seed),
                f"dx-{phase}": lambda: lora_triton.lora_fwd(dy, w.T, b.T, a.T, 2.0, None),
                f"dx-{phase}-dropout": lambda: lora_triton.lora_fwd(dy, w.T, b.T, a.T, 2.0, None, 0.1, seed,
                                                                    DROPOUT_OUTPUT),
                f"da-{phase}-dropout": lambda: lora_triton.dropped_t_matmul(x, _meta(M, R, dtype=lora_dtype), 0.1,
                                                                            seed),
            }
            if lora_dtype == dtype:  # mixed-adapter batches take one dtype
                stacks = _meta(ADAPTERS, K, R, dtype=dtype), _meta(ADAPTERS, R, N, dtype=dtype)
                order, index = _meta(M, dtype=torch.int64), _meta(M, dtype=torch.int32)
                scales = _meta(ADAPTERS, dtype=torch.float32)
                calls[f"batched-{phase}"] = lambda: batched.lora_batched_fwd(x, w, *stacks, scales, order, index, bias)
            for site, call in calls.items():
                if sites and not any(site.startswith(s) for s in sites):
                    continue
                with recording(launches, site + suffix, name, target):
                    call()
    torch.backends.cuda.matmul.allow_tf32 = False


@dataclass
class Binary:
    """One compiled binary and what ptxas and the metadata say of it (error: why it did not build)."""

    site: str
    dtype: str
    kernel: str
    config: str
    target: int
    grid: int = 0
    regs: int = 0
    spill: int = 0
    serialized: bool = False
    shared: int = 0
    ctas_per_sm: int = 0
    tensor_cores: str = ""
    error: Optional[str] = None

    def per_sm(self) -> float:
        return self.grid / DEVICES[self.target].sms

    def waves(self) -> float:
        return self.grid / max(1, self.ctas_per_sm * DEVICES[self.target].sms)

    def problems(self) -> list:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.spill:
            out.append(f"{self.spill} spill bytes per thread")
        if self.shared > DEVICES[self.target].smem_per_cta:
            out.append(f"shared {self.shared} B > {DEVICES[self.target].smem_per_cta} B per CTA: cannot launch")
        if self.kernel == "_split_k_kernel" and self.per_sm() < tile_configs.DECODE_WAVES:
            out.append(f"decode grid under {tile_configs.DECODE_WAVES} programs per SM")
        return out

    def line(self) -> str:
        head = f"sm_{self.target} {self.site:<28} {self.dtype:<15} {self.kernel:<32} {self.config:<26}"
        if self.error:
            return f"{head} ERROR {self.error}"
        flags = "; ".join(self.problems())
        return (f"{head} grid {self.grid:>6} ({self.per_sm():>6.2f}/SM) regs {self.regs:>3} spill {self.spill:>5} shared {self.shared:>6} "
                f"CTAs/SM {self.ctas_per_sm:>2} waves {self.waves():>6.2f} {self.tensor_cores:<5}"
                + (" serialized" if self.serialized else "") + (f"  <-- {flags}" if flags else ""))


def _config_name(config) -> str:
    if config is None:
        return "fixed"
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def _ptxas_usage(log: str) -> tuple:
    """(registers, spill-store bytes, wgmma serialized?) from the `ptxas -v` log of triton's own compile."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    if regs is None:
        raise RuntimeError(f"no register count in the ptxas log: {log[-300:]!r}")
    return int(regs.group(1)), int(spill.group(1)) if spill else 0, "serialized" in log


def _ctas_per_sm(device: Device, regs: int, warps: int, shared: int) -> int:
    """Resident CTAs on one SM: registers (allocated per warp in units of 256), threads, shared memory
    (plus 1 KiB the driver reserves per CTA) and the hardware cap, whichever binds first."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = device.regs_per_sm // max(1, regs_per_warp) // warps
    by_threads = device.threads_per_sm // (32 * warps)
    by_shared = device.smem_per_sm // (shared + 1024)
    return min(by_regs, by_threads, by_shared, device.ctas_per_sm)


@lru_cache(maxsize=None)
def _binder(fn: JITFunction, target: int) -> tuple:
    backend = make_backend(GPUTarget("cuda", target, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def _packed(launch: Launch, config) -> tuple:
    """(bound arguments, what triton.compile takes: signature, constexprs, attrs, options) of one launch
    with one config for its target, as triton's runtime binds them."""
    fn = launch.kernel
    kwargs = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    backend, binder = _binder(fn, launch.target)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return bound, signature, constexprs, attrs, options


def compile_key(launch: Launch, config) -> tuple:
    """What the binary depends on, as triton's cache keys it: the kernel's source (with its callees), the
    target and what triton.compile is given (integers only by their specialisation, so shapes that
    specialise alike share one binary)."""
    return _planned(launch, config)[0]


def _planned(launch: Launch, config) -> tuple:
    """(compile_key, grid size) of one launch with one config."""
    bound, signature, constexprs, attrs, options = _packed(launch, config)
    key = (launch.kernel.cache_key, launch.target, repr(signature), repr(sorted(constexprs.items(), key=repr)),
           repr(attrs), repr(sorted(options.__dict__.items())))
    return key, launch_grid(launch, bound)


def compile_binary(launch: Launch, config) -> Binary:
    """Compile one launch with one config for its target, as triton's runtime would."""
    fn, target = launch.kernel, launch.target
    binary = Binary(launch.site, launch.dtype, fn.__name__, _config_name(config), target)
    try:
        gpu = GPUTarget("cuda", target, 32)
        bound, signature, constexprs, attrs, options = _packed(launch, config)
        log = io.StringIO()
        with contextlib.redirect_stdout(log), knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True  # triton prints its own `ptxas -v` log: the flags it builds with
            knobs.compilation.always_compile = True  # a cached binary would come without a log
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu,
                                      options=options.__dict__)
        binary.regs, binary.spill, binary.serialized = _ptxas_usage(log.getvalue())
    except Exception as e:  # a binary that does not build is the finding
        binary.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return binary
    binary.grid = launch_grid(launch, bound)
    binary.shared = compiled.metadata.shared
    binary.ctas_per_sm = _ctas_per_sm(DEVICES[target], binary.regs, compiled.metadata.num_warps, binary.shared)
    ptx = compiled.asm["ptx"]
    binary.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    return binary


def launch_grid(launch: Launch, bound) -> int:
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    return int(torch.Size(grid).numel())


_JOBS: list = []  # (launch, config) of each distinct binary, filled before the worker processes fork


def _compile_job(i: int) -> Binary:
    return compile_binary(*_JOBS[i])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank.kernels.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--sites", help="call-site prefixes, comma-separated (fwd, dx, da, batched; default all)")
    parser.add_argument("--dtypes", help=f"comma-separated among {', '.join(d[0] for d in DTYPES)} (default all)")
    parser.add_argument("--shapes", help="weight shapes, comma-separated among "
                        f"{', '.join(f'{s} (K {k}, N {n})' for s, (k, n) in SHAPES.items())} (default all)")
    parser.add_argument("--first-config", action="store_true", help="only the first config of each autotuner")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 whatever the binaries show")
    args = parser.parse_args(argv)
    split = lambda text: text.split(",") if text else None
    for option, given, known in (("--dtypes", args.dtypes, [d[0] for d in DTYPES]), ("--shapes", args.shapes, SHAPES)):
        if set(split(given) or ()) - set(known):
            parser.error(f"{option}: unknown {', '.join(sorted(set(split(given)) - set(known)))}")
    launches = record_launches([int(t) for t in split(args.targets)], split(args.sites), split(args.dtypes),
                               split(args.shapes))
    wanted = [(launch, config) for launch in launches
              for config in (launch.configs[:1] if args.first_config else launch.configs)]
    plans = [_planned(launch, config) for launch, config in wanted]
    first = {}  # compile key -> index into _JOBS of the first launch config that asks for it
    _JOBS[:] = []
    for job, (key, _) in zip(wanted, plans):
        if key not in first:
            first[key] = len(_JOBS)
            _JOBS.append(job)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(launches)} launches, {len(wanted)} "
          f"launch configs, {len(_JOBS)} distinct binaries")
    binaries, compiled = [], []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = pool.map(_compile_job, range(len(_JOBS)))
        for launch, (key, grid) in zip((launch for launch, _ in wanted), plans):
            while len(compiled) <= first[key]:  # jobs come in the order of their first launch: print as they do
                compiled.append(next(results))
            binary = compiled[first[key]]
            binary = replace(binary, site=launch.site, dtype=launch.dtype, grid=0 if binary.error else grid)
            print(binary.line(), flush=True)
            binaries.append(binary)
    bad = [b for b in binaries if b.problems()]
    print(f"{len(binaries)} launch configs ({len(_JOBS)} distinct binaries), {len(binaries) - len(bad)} clean, "
          f"{len(bad)} with problems")
    return 0 if args.no_fail or not bad else 1


if __name__ == "__main__":
    sys.exit(main())
