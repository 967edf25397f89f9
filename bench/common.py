"""What every benchmark shares: timing, run metadata, result files.

Timers take {name: fn} and return {name: [median, p20, p80] ms}: on a GPU
from triton.testing.do_bench, on a CPU from `interleaved` repeats after a warm-up.
"""
import ctypes
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch


# GPT-2 small (124 M parameters) and a tiny model of the same structure for --quick smoke runs.
GPT2_SHAPES = {
    "full": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "quick": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128),
}


# Decoder-only models as transformers config kwargs by model_type: a published model's shape ("full", random
# weights) and a tiny one of the same structure ("quick").
DECODER_SHAPES = {
    "gpt2": GPT2_SHAPES,
    "gpt_neo": {  # EleutherAI/gpt-neo-125m
        "full": dict(hidden_size=768, num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]],
                     window_size=256, vocab_size=50257, max_position_embeddings=2048),
        "quick": dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                      window_size=8, vocab_size=512, max_position_embeddings=128),
    },
    "bloom": {  # bigscience/bloomz-560m
        "full": dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880),
        "quick": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=512),
    },
    "llama": {  # HuggingFaceTB/SmolLM-135M
        "full": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
        "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True),
    },
}


# t5-small (60 M parameters: 6 + 6 layers) and a tiny model of the same structure for --quick smoke runs.
T5_SHAPES = {
    "full": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "quick": dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}


def interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 3, repeats: int = 20,
                seconds: float = 0.0) -> Dict[str, List[float]]:
    """{name: [median, p20, p80] ms} of each fn() on the CPU: `warmup` calls each, then rounds of
    one call each until there have been `repeats` rounds and `seconds` have passed.

    The fns run in turn, in a fresh random order each round, so that a change in the machine's
    other load hits them all alike and their ratio stays meaningful; with a fixed or alternating
    order, the fns in the middle of a round always ran at the same point of the scheduler's time
    slice (fused/merged read 5x with three fns on an overloaded machine). A time budget spreads
    the samples of a fast fn over long enough that a burst of other load (a few hundred ms) moves
    few of them; a fixed count of a few-ms calls fits inside one such burst.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < seconds:
        shuffle(order)
        for name in order:
            t = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t) * 1e3)
        rounds += 1
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=10)
        out[name] = [statistics.median(s), q[1], q[7]]
    return out


def keep_freed_memory() -> None:
    """Have glibc keep freed memory instead of handing it back to the kernel (a no-op without mallopt).

    Otherwise, depending on where the heap happens to put them, an op's MB-sized temporaries are
    returned at every free and page-faulted in anew at the next call: on the CPU that made
    `x @ W + s * ((x @ A) @ B)` at M=512 take 7.6 ms in one process and 10.5 ms in the next.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest; else the line above freezes it at 128 KiB


def time_gpu(fns: Dict[str, Callable[[], object]]) -> Dict[str, List[float]]:
    """{name: [median, p20, p80] ms} of each fn() on the GPU, from triton.testing.do_bench."""
    import triton.testing

    return {name: list(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
            for name, fn in fns.items()}


def read_bandwidth(device: str = "cpu", nbytes: int = 512 << 20, repeats: int = 20) -> float:
    """Bytes per second that summing one fp32 tensor of nbytes reads on `device`: the median of `repeats`
    sums after a warm-up. Far larger than any cache, so it is the memory's read rate, the denominator of a
    bandwidth-bound floor (a decode step reads every weight once)."""
    x = torch.ones(nbytes // 4, device=device)
    if x.is_cuda:
        ms = time_gpu({"sum": x.sum})["sum"][0]
    else:
        ms = interleaved({"sum": x.sum}, warmup=1, repeats=repeats)["sum"][0]
    return nbytes / ms * 1e3


def save_lora_checkpoint(transformers, peft, folder: str, kind: str, shape: dict, config_kwargs: dict, lora: dict,
                         lora_b_std: float = 0.0) -> None:
    """Write into folder base/ (a `kind` causal LM of `shape` and config_kwargs, random weights, transformers'
    files) and adapter/ (peft's LoRA of `lora` kwargs on it; B drawn from N(0, lora_b_std) when > 0, so that
    the adapter changes the output, else peft's zeros). Seeded: the same arguments give the same files."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **shape, **config_kwargs, bos_token_id=0, eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(f"{folder}/base")
    base = transformers.AutoModelForCausalLM.from_pretrained(f"{folder}/base")
    theirs = peft.get_peft_model(base, peft.LoraConfig(**lora, task_type="CAUSAL_LM"))
    if lora_b_std > 0:
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=lora_b_std)
    theirs.save_pretrained(f"{folder}/adapter")


def load_lora_pair(transformers, peft, folder: str, train: bool, dtype=None, device="cpu") -> tuple:
    """(ours, theirs): lowrank's and peft's PeftModel of save_lora_checkpoint's folder, the same weights in
    `dtype` (None: the files') on `device`, in train mode with a trainable adapter when `train`, else eval."""
    import lowrank
    from lowrank import models

    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(f"{folder}/base", dtype=dtype, device=device),
                                             f"{folder}/adapter", is_trainable=train)
    base = transformers.AutoModelForCausalLM.from_pretrained(f"{folder}/base", dtype=dtype).to(device)
    theirs = peft.PeftModel.from_pretrained(base, f"{folder}/adapter", is_trainable=train)
    for model in (ours, theirs):
        model.train(train)
    return ours, theirs


def run_info() -> Dict[str, str]:
    """Device, versions, git sha and date recorded with every result row."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        sha = ""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": sha or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        import triton

        info["device"] = torch.cuda.get_device_name()
        info["triton"] = triton.__version__
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def write_json(path: str, info: Dict[str, str], rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"run": info, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def cpu_comparison_args(description: str, name: str, repeats_help: str, default_repeats: int, argv=None,
                        add_arguments: Optional[Callable] = None):
    """(args, mode, repeats) of a CPU benchmark against transformers: --model (a DECODER_SHAPES model type,
    default gpt2), --quick (mode "quick", 3 repeats; else "full", default_repeats), --threads (set here),
    --repeats, --json (default bench/out/<name>[_<model>].json), and what add_arguments(parser) adds.
    transformers is imported here with its logging and progress bars quieted."""
    import argparse

    import transformers

    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--model", choices=sorted(DECODER_SHAPES), default="gpt2", help="model type (default gpt2)")
    parser.add_argument("--quick", action="store_true", help="tiny model and inputs (smoke test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed {repeats_help} each (default {default_repeats}, quick 3)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.json = args.json or f"bench/out/{name}{'' if args.model == 'gpt2' else '_' + args.model}.json"
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    return args, mode, args.repeats or (3 if args.quick else default_repeats)


def pyplot(path: str):
    """matplotlib.pyplot on the Agg backend, or None (saying that `path` is skipped) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping {path} (pip install matplotlib)")
        return None
    return plt
