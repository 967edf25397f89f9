"""Does torch.compile make our LoRA models faster than eager, and at least as fast as transformers + peft
compiled, on the same weights?

    prefill: model(ids) with full logits, batch 1 x 512 tokens, no cache                    -> tokens/s
    decode:  (generate(n new) - generate(1 new)) / (n - 1), greedy, n = 33 after 64 tokens,
             on a preallocated KV cache (ours) or transformers' static cache               -> tokens/s
    train:   loss = model(ids, labels=ids).loss; backward; AdamW step of the adapter, LoRA
             dropout as configured (LORA_DROPOUT), batch 2 x 128                           -> tokens/s

Each in four variants: ours and transformers + peft, eager and compiled. Compiled means what a user writes:
`torch.compile(model)` for prefill and train; for decode, ours
`model.generate(ids, max_new_tokens=n, cache_implementation="static", compile=True)` and transformers'
`generate(ids, ..., cache_implementation="static", compile_config=CompileConfig(...))` (on a CPU its compile
must be asked for with `compile_config._compile_all_devices = True`; on CUDA a static cache compiles by
itself, in its default mode="reduce-overhead": CUDA graphs; ours picks the same there). The compiles start
from an empty Inductor cache.

Random weights (no download) of GPT-2 small (--model gpt2) or SmolLM-135M's shape (--model llama), LoRA r=8 on
bench/lora_train_cpu.TARGETS with a random B; fp32 on a CPU (Inductor's C++ backend), bf16 on CUDA. The
variants run interleaved after a warm-up; the first call is timed alone (compile time, reported apart);
figures are medians with p20/p80. Before anything is timed every variant's logits and greedy tokens are
checked against ours eager. The decode floor: the weights' bytes over the read bandwidth measured here.

Prints a table whose last line is the headline ratios and writes JSON rows.
Usage: python bench/compiled.py [--model gpt2|llama] [--quick] [--threads N] [--repeats R] [--backend B] [--json PATH]
"""
import logging
import os
import sys
import tempfile
import time
import warnings

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (DECODER_SHAPES, cpu_comparison_args, interleaved, load_lora_pair,  # noqa: E402
                          read_bandwidth, run_info, save_lora_checkpoint, time_gpu, write_json)
from bench.lora_train_cpu import NO_DROPOUT, TARGETS, trainer  # noqa: E402

SIZES = {"full": dict(prefill=512, prompt=64, new=33, train=[2, 128]),
         "quick": dict(prefill=32, prompt=8, new=5, train=[2, 16])}
LORA_DROPOUT = 0.05
LORA_B_STD = 0.02  # a trained-looking adapter: it moves the logits, so the agreement checks see it


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def prefill_fns(pair, ids, backend: str) -> dict:
    """{variant: fn() -> logits (1, T, V)}."""
    ours, theirs = pair
    ours_c, theirs_c = torch.compile(ours, backend=backend), torch.compile(theirs, backend=backend)
    return {"ours eager": lambda: ours(ids).logits, "ours compiled": lambda: ours_c(ids).logits,
            "peft eager": lambda: theirs(ids, use_cache=False).logits,
            "peft compiled": lambda: theirs_c(ids, use_cache=False).logits}


def decode_fns(transformers, pair, prompt, backend: str, device: str) -> dict:
    """{variant: fn(n) -> (1, prompt + n) greedy tokens}."""
    ours, theirs = pair
    config = transformers.CompileConfig(backend=backend)
    config._compile_all_devices = device == "cpu"  # transformers compiles on CPUs only when told to
    greedy = dict(do_sample=False, cache_implementation="static")
    ours_compile = True if backend == "inductor" else {"backend": backend}  # True: the line a user writes
    return {"ours eager": lambda n: ours.generate(prompt, max_new_tokens=n),
            "ours compiled": lambda n: ours.generate(prompt, max_new_tokens=n, cache_implementation="static",
                                                     compile=ours_compile),
            "peft eager": lambda n: theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, **greedy,
                                                    disable_compile=True),
            "peft compiled": lambda n: theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, **greedy,
                                                       compile_config=config)}


def train_fns(eager, compiled, ids, backend: str) -> dict:
    """{variant: fn() -> the loss before the step}: four models, each with its own AdamW."""
    (ours, theirs), (ours_c, theirs_c) = eager, compiled
    return {"ours eager": trainer(ours, ids), "ours compiled": trainer(torch.compile(ours_c, backend=backend), ids),
            "peft eager": trainer(theirs, ids), "peft compiled": trainer(torch.compile(theirs_c, backend=backend), ids)}


def first_calls(fns: dict, device: str) -> tuple:
    """({variant: (seconds, graphs compiled) of its first call}, {variant: its output}): a compiled variant's
    first call is its compile, into one graph unless something breaks it."""
    firsts, outputs = {}, {}
    for name in fns:
        counters.clear()
        start = time.perf_counter()
        outputs[name] = fns[name]()
        synchronize(device)
        firsts[name] = (time.perf_counter() - start, counters["stats"]["unique_graphs"])
    return firsts, outputs


def check_agreement(outputs: dict, what: str, distance, tolerance: float) -> dict:
    """{variant: distance(its output, ours eager's)} over the tensor outputs; SystemExit above tolerance."""
    reference = outputs["ours eager"]
    distances = {name: distance(out, reference) for name, out in outputs.items()}
    if max(distances.values()) > tolerance:
        raise SystemExit(f"{what} disagree with ours eager's: {distances}")
    return distances


max_abs_difference = lambda a, b: (a.float() - b.float()).abs().max().item()
tokens_differing = lambda a, b: int((a != b).sum())


def workload_rows(workload: str, times: dict, firsts: dict, outputs: dict, tokens: int, checks: dict) -> list:
    """One JSON row per variant: median, p20 and p80 ms per `tokens`, tokens/s, the first call's seconds and
    graphs compiled, and checks ({name: {variant: value}})."""
    rows = []
    for name in outputs:
        median, p20, p80 = times[name]
        row = dict(workload=workload, variant=name, median_ms=median, p20_ms=p20, p80_ms=p80,
                   tokens_per_s=tokens / median * 1e3, first_call_s=firsts[name][0], graphs=firsts[name][1])
        row.update({check: values[name] for check, values in checks.items()})
        rows.append(row)
    return rows


def prefill_rows(transformers, peft, folder, run) -> list:
    ids = torch.randint(0, run["vocab"], (1, run["sizes"]["prefill"]), device=run["device"])
    fns = prefill_fns(load_lora_pair(transformers, peft, folder, False, run["dtype"], run["device"]), ids,
                      run["backend"])
    with torch.no_grad():
        firsts, outputs = first_calls(fns, run["device"])
        diffs = check_agreement(outputs, "prefill logits", max_abs_difference, run["logit_tolerance"])
        times = run["timer"](fns)
    return workload_rows("prefill", times, firsts, outputs, ids.numel(), dict(max_abs_logit_diff=diffs))


def decode_rows(transformers, peft, folder, run) -> list:
    """Per variant: generate n and 1 new tokens; ms per token = (n's - 1's) / (n - 1), with n's p20 and p80
    beside 1's median for the spread (the longer call holds nearly all of it)."""
    new = run["sizes"]["new"]
    prompt = torch.randint(0, run["vocab"], (1, run["sizes"]["prompt"]), device=run["device"])
    load = lambda: load_lora_pair(transformers, peft, folder, False, run["dtype"], run["device"])
    generate = decode_fns(transformers, load(), prompt, run["backend"], run["device"])
    firsts, outputs = first_calls({name: (lambda f=f: f(new)) for name, f in generate.items()}, run["device"])
    differing = check_agreement(outputs, "greedy tokens", tokens_differing, run["token_tolerance"])
    times = run["timer"]({(name, n): (lambda f=generate[name], n=n: f(n)) for name in firsts for n in (new, 1)})
    per_token = {name: [(t - times[(name, 1)][0]) / (new - 1) for t in times[(name, new)]] for name in firsts}
    floors = {name: per_token[name][0] / run["floor_ms"] for name in firsts}
    calls = {name: dict(new=times[(name, new)], one=times[(name, 1)]) for name in firsts}
    return workload_rows("decode", per_token, firsts, outputs, 1,
                         dict(tokens_differing=differing, x_floor=floors, generate_ms=calls))


def train_rows(transformers, peft, folder, run) -> list:
    ids = torch.randint(0, run["vocab"], run["sizes"]["train"], generator=torch.Generator().manual_seed(1))
    ids = ids.to(run["device"])
    load = lambda: load_lora_pair(transformers, peft, folder, True, run["dtype"], run["device"])
    fns = train_fns(load(), load(), ids, run["backend"])
    firsts, outputs = first_calls(fns, run["device"])
    # LoRA dropout draws other masks in each variant, so the first losses agree only to within its effect.
    diffs = check_agreement(outputs, "first-step losses", max_abs_difference, run["loss_tolerance"])
    times = run["timer"](fns)
    return workload_rows("train", times, firsts, outputs, ids.numel(), dict(first_loss_diff=diffs))


def weights_bytes(model) -> int:
    """Bytes of the model's parameters, each shared tensor (a tied head) once: what a decode step reads."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def add_arguments(parser) -> None:
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; quick: aot_eager)")


def main(argv=None):
    args, mode, repeats = cpu_comparison_args(__doc__.splitlines()[0], "compiled", "repeats", 5, argv, add_arguments)
    import peft
    import transformers

    warnings.filterwarnings("ignore", category=UserWarning)  # peft's fan_in_fan_out note on Conv1D targets
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations inside peft
    torch._logging.set_logs(dynamo=logging.ERROR)  # the rows count graphs; break warnings would bury the table
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = DECODER_SHAPES[args.model][mode]
    lora = dict(r=8, lora_alpha=16, lora_dropout=LORA_DROPOUT, target_modules=TARGETS[args.model])
    bandwidth = read_bandwidth(device, 64 << 20 if args.quick else 1 << 30)
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    with tempfile.TemporaryDirectory(prefix="compiled_") as folder, fresh_cache():  # compile times from cold
        save_lora_checkpoint(transformers, peft, folder, args.model, shape, NO_DROPOUT[args.model], lora, LORA_B_STD)
        nbytes = weights_bytes(load_lora_pair(transformers, peft, folder, False, dtype, device)[0])
        fp32 = dtype == torch.float32
        run = dict(device=device, dtype=dtype, sizes=SIZES[mode], vocab=shape["vocab_size"], backend=backend,
                   floor_ms=nbytes / bandwidth * 1e3,
                   timer=time_gpu if device == "cuda" else lambda fns: interleaved(fns, warmup=1, repeats=repeats),
                   logit_tolerance=1e-3 if fp32 else 0.25, token_tolerance=0 if fp32 else float("inf"),
                   loss_tolerance=2e-2 if fp32 else 0.1)
        rows = [row for workload in (prefill_rows, decode_rows, train_rows)
                for row in workload(transformers, peft, folder, run)]
    for row in rows:
        row.update(model=args.model, sizes=run["sizes"], shape=shape, dtype=str(dtype).removeprefix("torch."),
                   device=device, lora=lora, backend=backend)
    info = {**run_info(), "transformers": transformers.__version__, "peft": peft.__version__, "mode": mode,
            "repeats": str(repeats), "backend": backend, "read_bandwidth_GB_s": f"{bandwidth / 1e9:.2f}",
            "weights_bytes": str(nbytes), "decode_floor_ms": f"{run['floor_ms']:.2f}"}
    write_json(args.json, info, rows)
    print_table(args, info, rows, shape)
    return rows


def print_table(args, info, rows, shape) -> None:
    """The rows, then the headline: ours compiled against ours eager and against peft compiled, and decode's
    distance from the memory floor."""
    print(f"{args.model} {info['mode']} {shape}, {rows[0]['dtype']}, backend {info['backend']}, "
          f"{args.threads} threads, "
          f"{info['device']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}; "
          f"read bandwidth {info['read_bandwidth_GB_s']} GB/s, decode floor {info['decode_floor_ms']} ms/token")
    print(f"{'workload':<9}{'variant':<30}{'ms':>10}{'p20-p80':>18}{'tokens/s':>10}{'first call s':>13}{'graphs':>8}")
    by = {(r["workload"], r["variant"]): r for r in rows}
    for r in rows:
        print(f"{r['workload']:<9}{r['variant']:<30}{r['median_ms']:>10.2f}{r['p20_ms']:>9.2f}-{r['p80_ms']:<8.2f}"
              f"{r['tokens_per_s']:>10.1f}{r['first_call_s']:>13.1f}{r['graphs']:>8}")
    ratios = lambda other: ", ".join(f"{w} {by[(w, other)]['median_ms'] / by[(w, 'ours compiled')]['median_ms']:.2f}x"
                                     for w in ("prefill", "decode", "train"))
    print(f"{args.model} ours compiled (>1 = faster) vs ours eager: {ratios('ours eager')}; vs peft compiled: "
          f"{ratios('peft compiled')}; decode at {by[('decode', 'ours compiled')]['x_floor']:.2f}x the memory floor")


if __name__ == "__main__":
    main()
