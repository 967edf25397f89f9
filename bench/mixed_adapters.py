"""How much does serving many LoRA adapters in one batch cost, against one adapter
and against PEFT's loop over adapters?

    batched:  kernels.lora_matmul_batched, one launch whatever the mix
    loop:     PEFT's way: the base product, then per adapter its rows gathered,
              (x_i @ A_i) @ B_i * s_i, and added back
    single:   kernels.lora_matmul with every row on one adapter (the target's yardstick)

Rows are spread evenly over 1, 4, 16 and 64 adapters, in random order. On a
CUDA machine: bf16, K=N=4096, r=16, 64 decode rows and 8192 prefill rows.
Without a GPU it times the torch path at small sizes and says so.

Usage: python bench/mixed_adapters.py [--quick] [--out bench/out]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lowrank import kernels  # noqa: E402
from bench.common import interleaved, pyplot, run_info, time_gpu, write_json  # noqa: E402


def operands(M, K, N, r, n, dtype, device):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = randn(M, K)
    W = randn(N, K, std=K ** -0.5).T
    A = randn(n, K, r, std=K ** -0.5)
    B = randn(n, N, r, std=r ** -0.5).transpose(1, 2)  # stacked lora_B weights (N, r), seen as (r, N)
    scales = torch.rand(n, generator=g).to(device) + 0.5
    index = (torch.arange(M) % n)[torch.randperm(M, generator=g)].to(device)
    return x, W, A, B, scales, index


def peft_loop(x, W, A, B, scales, index):
    y = x @ W
    for i in index.unique().tolist():
        rows = (index == i).nonzero().squeeze(1)
        y.index_add_(0, rows, (x.index_select(0, rows) @ A[i]) @ B[i], alpha=float(scales[i]))
    return y


def measure(phases, adapter_counts, K, N, r, dtype, device, timer):
    rows = []
    for phase, M in phases:
        for n in adapter_counts:
            x, W, A, B, scales, index = operands(M, K, N, r, n, dtype, device)
            with torch.no_grad():
                row = dict(phase=phase, M=M, K=K, N=N, r=r, adapters=n, dtype=str(dtype).replace("torch.", ""))
                times = timer({"batched": lambda: kernels.lora_matmul_batched(x, W, A, B, scales, index),
                               "loop": lambda: peft_loop(x, W, A, B, scales, index),
                               "single": lambda: kernels.lora_matmul(x, W, A[0], B[0], float(scales[0]))})
            row.update({f"{name}_ms": t for name, t in times.items()})
            row["batched_over_single"] = row["batched_ms"][0] / row["single_ms"][0]
            row["loop_over_batched"] = row["loop_ms"][0] / row["batched_ms"][0]
            rows.append(row)
            print(f"{phase:<8}{M:>6}{n:>9}{row['batched_ms'][0]:>12.4f}{row['loop_ms'][0]:>10.4f}"
                  f"{row['single_ms'][0]:>11.4f}{row['batched_over_single']:>11.3f}{row['loop_over_batched']:>10.2f}",
                  flush=True)
    return rows


def plot(rows, path):
    plt = pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for phase in sorted({r["phase"] for r in rows}):
        sel = [r for r in rows if r["phase"] == phase]
        ax.plot([r["adapters"] for r in sel], [r["batched_over_single"] for r in sel], "o-", label=f"{phase}: batched / single")
        ax.plot([r["adapters"] for r in sel], [r["loop_ms"][0] / r["single_ms"][0] for r in sel], "s--", label=f"{phase}: loop / single")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters in the batch")
    ax.set_ylabel("time / single-adapter fused time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    info = run_info()
    counts = [1, 16] if args.quick else [1, 4, 16, 64]
    if on_gpu:
        phases, K, N, dtype, timer = [("decode", 64), ("prefill", 8192)], 4096, 4096, torch.bfloat16, time_gpu
    else:
        phases, K, N, dtype, timer = [("decode", 64), ("prefill", 1024)], 768, 768, torch.float32, interleaved
        print("No CUDA device: timing the torch CPU path (fp32, K=N=768). These figures say nothing about "
              "the Triton kernels; run on a GPU for those.")
    print(f"device: {info['device']}; torch {info['torch']}; git {info['git_sha']}; {info['date']}")
    print(f"{'phase':<8}{'M':>6}{'adapters':>9}{'batched ms':>12}{'loop ms':>10}{'single ms':>11}{'b/single':>11}{'loop/b':>10}")
    rows = measure(phases, counts, K, N, 16, dtype, "cuda" if on_gpu else "cpu", timer)
    stem = os.path.join(args.out, "mixed_adapters_" + ("gpu" if on_gpu else "cpu"))
    write_json(stem + ".json", info, rows)
    plot(rows, stem + ".png")
    print(f"wrote {stem}.json")
    pick = [r for r in rows if r["adapters"] == 16]
    print("headline (16 adapters): " + "; ".join(
        f"{r['phase']} M={r['M']}: batched/single {r['batched_over_single']:.3f}x, loop/batched {r['loop_over_batched']:.2f}x"
        for r in pick))


if __name__ == "__main__":
    main()
