"""How close is the fused LoRA matmul to one GEMM on a pre-merged weight, and how
much faster than computing LoRA as PEFT does, with separate ops?

    fused:    kernels.lora_matmul(x, W, A, B, s)         (Triton on CUDA)
    merged:   x @ W'  with W' = W + s*A@B precomputed    (the floor)
    unfused:  x @ W + s * ((x @ A) @ B)                  (PEFT's separate matmuls)

each for the forward alone and for forward+backward (gradients to x, A, B; the
merged weight gets only dX). Operands are laid out as in a model: W, A and B
are `nn.Linear`-style weights seen through `.T`, so nothing is copied. Beside
the plain product, two training configurations at one prefill and one decode
shape: LoRA dropout 0.1 (forward+backward) and fp32 adapters on 16-bit x and W.

On a CUDA machine: bf16, K=N in {768, 4096} and K=4096,N=11008, r in {8, 16, 64},
prefill M in {512, 2048, 8192}, decode M in {1, 8, 32}, timed with
triton.testing.do_bench. Without a GPU it times the torch path on the CPU at
small sizes, on one thread, for 2 s a row, and says so: those figures say nothing
about the kernels' speed.

Prints a table (last line: the headline ratios), writes JSON rows and a PNG.
Usage: python bench/fused_vs_merged.py [--quick] [--out bench/out]
"""
import argparse
import functools
import os
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lowrank import kernels  # noqa: E402
from bench.common import interleaved, keep_freed_memory, pyplot, run_info, time_gpu, write_json  # noqa: E402

SCALE = 2.0


# The configurations people train with, beside the plain product: LoRA dropout 0.1 (fused: the mask made
# in the kernel; unfused: F.dropout on x, PEFT's way) and fp32 adapters on 16-bit x and W (PEFT's default).
VARIANTS = ("plain", "dropout0.1", "fp32-adapters")


@dataclass(frozen=True)
class Case:
    phase: str
    M: int
    K: int
    N: int
    r: int
    variant: str = "plain"

    def flops(self) -> int:
        return 2 * self.M * self.N * self.K + 2 * self.M * self.r * (self.K + self.N)


def with_variants(cases, at):
    """cases, plus the non-plain variants of those whose (phase, M, K, N, r) is in `at`."""
    extra = [Case(c.phase, c.M, c.K, c.N, c.r, v) for c in cases if (c.phase, c.M, c.K, c.N, c.r) in at
             for v in VARIANTS[1:]]
    return cases + extra


def gpu_cases(quick: bool):
    shapes = [(4096, 4096)] if quick else [(768, 768), (4096, 4096), (4096, 11008)]
    ranks = [16] if quick else [8, 16, 64]
    rows = [("prefill", m) for m in ([8192] if quick else [512, 2048, 8192])]
    rows += [("decode", m) for m in ([1, 8] if quick else [1, 8, 32])]
    cases = [Case(phase, M, K, N, r) for K, N in shapes for r in ranks for phase, M in rows]
    return with_variants(cases, {("prefill", 8192, 4096, 4096, 16), ("decode", 8, 4096, 4096, 16)})


def cpu_cases(quick: bool):
    ranks = [16] if quick else [8, 16]
    rows = [("prefill", 256)] if quick else [("prefill", 128), ("prefill", 512)]
    rows += [("decode", 1)] if quick else [("decode", 1), ("decode", 8)]
    cases = [Case(phase, M, 768, 768, r) for r in ranks for phase, M in rows]
    return with_variants(cases, {("prefill", 256 if quick else 512, 768, 768, 16), ("decode", 1 if quick else 8, 768, 768, 16)})


def operands(case: Case, dtype, device):
    """x, W (a Linear weight seen as (K, N)), A, B (PEFT's factors seen as (K, r), (r, N)), the merged
    weight, dy; the fp32-adapters variant keeps A and B in fp32 beside 16-bit x and W."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lora_dtype = torch.float32 if case.variant == "fp32-adapters" else dtype

    def randn(*shape, std=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = randn(case.M, case.K)
    W = randn(case.N, case.K, std=case.K ** -0.5).T  # nn.Linear weight (out, in), seen as (K, N)
    A = randn(case.r, case.K, std=case.K ** -0.5, dtype=lora_dtype).T  # lora_A.weight (r, in)
    B = randn(case.N, case.r, std=case.r ** -0.5, dtype=lora_dtype).T  # lora_B.weight (out, r)
    merged = (W.float() + SCALE * A.float() @ B.float()).to(dtype).T.contiguous().T
    dy = randn(case.M, case.N)
    return x, W, A, B, merged, dy


def methods(x, W, A, B, merged, dy, dropout_p=0.0):
    """name -> (forward-only fn, forward+backward fn). unfused is PEFT's way: the low-rank path in the
    adapters' dtype on dropout(x), added to the base output and cast back."""
    xg, Ag, Bg = (t.detach().clone().requires_grad_() for t in (x, A, B))

    def grads(y, inputs):
        return torch.autograd.grad(y, inputs, dy)

    def fused(x, A, B):
        return kernels.lora_matmul(x, W, A, B, SCALE, dropout_p=dropout_p)

    def unfused(x, A, B):
        low_rank = (torch.nn.functional.dropout(x.to(A.dtype), dropout_p) @ A) @ B
        return (x @ W + SCALE * low_rank).to(x.dtype)

    return {
        "fused": (lambda: fused(x, A, B), lambda: grads(fused(xg, Ag, Bg), (xg, Ag, Bg))),
        "merged": (lambda: x @ merged, lambda: grads(xg @ merged, (xg,))),
        "unfused": (lambda: unfused(x, A, B), lambda: grads(unfused(xg, Ag, Bg), (xg, Ag, Bg))),
    }


def measure(cases, dtype, device, timer):
    rows = []
    for case in cases:
        dropout_p = 0.1 if case.variant == "dropout0.1" else 0.0
        fns = methods(*operands(case, dtype, device), dropout_p=dropout_p)
        # Dropout is live in training only: its rows time forward+backward.
        for pass_name, index in (("fwd", 0), ("fwd+bwd", 1))[1 if dropout_p else 0:]:
            row = dict(asdict(case), dtype=str(dtype).replace("torch.", ""), pass_=pass_name)
            with torch.set_grad_enabled(index == 1):
                times = timer({name: pair[index] for name, pair in fns.items()})
            row.update({f"{name}_ms": t for name, t in times.items()})
            row["fused_over_merged"] = row["fused_ms"][0] / row["merged_ms"][0]
            row["fused_over_unfused"] = row["fused_ms"][0] / row["unfused_ms"][0]
            row["fused_tflops"] = case.flops() / (row["fused_ms"][0] * 1e-3) / 1e12
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = (f"{'phase':<8}{'M':>6}{'K':>6}{'N':>7}{'r':>4} {'variant':<14}{'pass':<8}{'fused ms':>10}{'merged ms':>10}"
          f"{'unfused ms':>11}{'f/merged':>9}{'f/unfused':>10}{'TFLOP/s':>9}")


def format_row(row) -> str:
    return (f"{row['phase']:<8}{row['M']:>6}{row['K']:>6}{row['N']:>7}{row['r']:>4} {row['variant']:<14}{row['pass_']:<8}"
            f"{row['fused_ms'][0]:>10.4f}{row['merged_ms'][0]:>10.4f}{row['unfused_ms'][0]:>11.4f}"
            f"{row['fused_over_merged']:>9.3f}{row['fused_over_unfused']:>10.3f}{row['fused_tflops']:>9.2f}")


def headline(rows, on_gpu: bool) -> str:
    def pick(pass_name, phase, M, K=4096, N=4096, r=16):
        for row in rows:
            if (row["pass_"], row["phase"], row["M"], row["K"], row["N"], row["r"], row["variant"]) == (
                    pass_name, phase, M, K, N, r, "plain"):
                return row
        return None

    if on_gpu:
        fwd, bwd, dec = pick("fwd", "prefill", 8192), pick("fwd+bwd", "prefill", 8192), pick("fwd", "decode", 8)
        if fwd and bwd and dec:
            return (f"headline (K=N=4096, r=16, bf16): prefill M=8192 fused/merged {fwd['fused_over_merged']:.3f}x, "
                    f"fused/unfused {fwd['fused_over_unfused']:.3f}x; fwd+bwd fused/unfused "
                    f"{bwd['fused_over_unfused']:.3f}x; decode M=8 fused/merged {dec['fused_over_merged']:.3f}x")
    # Over all prefill forward rows, so that one row's bad luck cannot carry the headline.
    sel = [r for r in rows if r["pass_"] == "fwd" and r["phase"] == "prefill" and r["variant"] == "plain"]

    def values(key):
        return "/".join(str(v) for v in sorted({r[key] for r in sel}))

    def gmean(key):
        return statistics.geometric_mean(r[key] for r in sel)

    where = "GPU" if on_gpu else "CPU torch path, not the Triton kernels"
    return (f"headline ({where}; prefill fwd, geometric mean over M={values('M')} K={values('K')} N={values('N')} "
            f"r={values('r')}): fused/merged {gmean('fused_over_merged'):.3f}x, "
            f"fused/unfused {gmean('fused_over_unfused'):.3f}x")


def plot(rows, path: str) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, pass_name in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["pass_"] == pass_name]
        labels = [f"{r['phase'][0]}{r['M']} {r['K']}x{r['N']} r{r['r']}" + ("" if r["variant"] == "plain" else
                  f" {r['variant']}") for r in sel]
        xs = range(len(sel))
        ax.plot(xs, [r["fused_over_merged"] for r in sel], "o-", label="fused / merged")
        ax.plot(xs, [r["fused_over_unfused"] for r in sel], "s-", label="fused / unfused")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
        ax.set_title(pass_name)
        ax.set_ylabel("time ratio (lower is better for fused)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases only (smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        cases, dtype, timer = gpu_cases(args.quick), torch.bfloat16, time_gpu
    else:
        # One thread: on a small machine shared with other work a two-thread GEMM waits, op after
        # op, for whichever core another process holds, and the fused path (three GEMMs) pays that
        # more often than the merged one (on a loaded 2-core machine fused/merged read 2.5x with two
        # threads, 1.04-1.09x with one).
        torch.set_num_threads(1)
        keep_freed_memory()
        timer = functools.partial(interleaved, seconds=0.0 if args.quick else 2.0)
        cases, dtype = cpu_cases(args.quick), torch.float32
        print("No CUDA device: timing the torch CPU path (fp32, small sizes, one thread). These figures say "
              "nothing about the Triton kernels; run on a GPU for those.")
    info = run_info()
    print(f"device: {info['device']}; torch {info['torch']}; git {info['git_sha']}; {info['date']}")
    print(HEADER)
    rows = measure(cases, dtype, "cuda" if on_gpu else "cpu", timer)
    stem = os.path.join(args.out, "fused_vs_merged_" + ("gpu" if on_gpu else "cpu"))
    write_json(stem + ".json", info, rows)
    plot(rows, stem + ".png")
    print(f"wrote {stem}.json")
    print(headline(rows, on_gpu))


if __name__ == "__main__":
    main()
