"""Are our models at least as fast as transformers' on a CPU, for the same weights and threads?

    prefill: model(ids) with full logits, batch 1 x T tokens, no cache       -> tokens/s
    decode:  (generate(n new) - generate(1 new)) / (n - 1), greedy, each
             library's own generate with its KV cache                        -> ms/token
    load:    from_pretrained of one saved safetensors folder (page cache warm) -> ms
    t5 generate: greedy generate of n new tokens from a T-token input, T5     -> ms (--model gpt2 only)
    lora train step: bench/lora_train_cpu.py's step against peft             -> ms (--model llama only)

Random weights (no download), fp32, of GPT-2 small and t5-small by default; --model gpt_neo, bloom or
llama: gpt-neo-125m's, bloomz-560m's or SmolLM-135M's shape (bench/common.DECODER_SHAPES). Ours and transformers' run interleaved
(alternating order each repeat) after a warm-up; figures are medians with p20/p80. Both models
are checked to agree (logits, greedy tokens) before anything is timed.

Prints a table whose last line is the headline ratios (> 1: ours is faster) and writes JSON rows.
Usage: python bench/model_cpu.py [--model TYPE] [--quick] [--threads N] [--repeats R] [--json PATH]
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lowrank import models  # noqa: E402
from bench.common import DECODER_SHAPES, T5_SHAPES, cpu_comparison_args, interleaved, run_info, write_json  # noqa: E402
from bench.lora_train_cpu import train_step_times  # noqa: E402

LENGTHS = {"full": dict(prefill=512, prompt=64, new=33), "quick": dict(prefill=64, prompt=8, new=9)}
HEADLINES = {"prefill_tokens_per_s": "prefill", "decode_ms_per_token": "decode", "load_ms": "load",
             "t5_generate_ms": "t5 generate", "lora_train_step_ms": "lora train step (vs peft)"}
T5_LENGTHS = {"full": dict(source=128, new=32), "quick": dict(source=16, new=8)}


def check_agreement(ours, hf, ids, new):
    with torch.inference_mode():
        diff = (ours(ids).logits - hf(ids, use_cache=False).logits).abs().max().item()
        same = torch.equal(models.generate(ours, ids[:, :8], max_new_tokens=new),
                           hf.generate(ids[:, :8], max_new_tokens=new, min_new_tokens=new, do_sample=False))
    if not same or diff > 1e-3:
        raise SystemExit(f"models disagree: max |logit diff| {diff:.2e}, greedy tokens equal: {same}")
    return diff


def t5_generation(transformers, mode, repeats):
    """The t5 generate row: ours and transformers' greedy generate of `new` tokens, after checking that ours
    equals a greedy loop over transformers' forward (the reference by definition, whatever its generate does)."""
    shape, lengths = T5_SHAPES[mode], T5_LENGTHS[mode]
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**shape, decoder_start_token_id=0)).eval()
    folder = tempfile.mkdtemp(prefix="model_cpu_t5_")
    hf.save_pretrained(folder)
    ours = models.from_pretrained(folder)
    source = torch.randint(2, shape["vocab_size"], (1, lengths["source"]))
    new = lengths["new"]
    with torch.inference_mode():
        mine = models.generate(ours, source, max_new_tokens=new)
        decoded = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(new):
            decoded = torch.cat([decoded, hf(input_ids=source, decoder_input_ids=decoded).logits[:, -1:].argmax(-1)], 1)
        if not torch.equal(mine, decoded):
            raise SystemExit("T5 greedy tokens differ from a greedy loop over transformers' forward")
        times = interleaved({
            "ours": lambda: models.generate(ours, source, max_new_tokens=new),
            "hf": lambda: hf.generate(source, max_new_tokens=new, min_new_tokens=new, do_sample=False)},
            warmup=1, repeats=repeats)
    return dict(metric="t5_generate_ms", ours=times["ours"][0], transformers=times["hf"][0],
                ours_ms_p20_p80=times["ours"][1:], transformers_ms_p20_p80=times["hf"][1:],
                ratio=times["hf"][0] / times["ours"][0], source_tokens=lengths["source"], new_tokens=new,
                shape=shape, dtype="float32")


def decoder_rows(transformers, kind: str, mode: str, repeats: int) -> tuple:
    """(prefill, decode and load rows, max |logit diff|) of ours against transformers' `kind` causal LM."""
    shape, lengths = DECODER_SHAPES[kind][mode], LENGTHS[mode]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(kind, **shape, bos_token_id=0, eos_token_id=0)).eval()
    hf.generation_config.pad_token_id = 0
    folder = tempfile.mkdtemp(prefix="model_cpu_")
    hf.save_pretrained(folder)
    ours = models.from_pretrained(folder)
    ids = torch.randint(0, shape["vocab_size"], (1, lengths["prefill"]))
    diff = check_agreement(ours, hf, ids, 4)

    prompt, new = ids[:, : lengths["prompt"]], lengths["new"]
    ours_gen = lambda n: models.generate(ours, prompt, max_new_tokens=n)
    hf_gen = lambda n: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.inference_mode():
        prefill = interleaved({"ours": lambda: ours(ids).logits, "hf": lambda: hf(ids, use_cache=False).logits},
                              warmup=2, repeats=repeats)
        decode = interleaved({"ours_n": lambda: ours_gen(new), "ours_1": lambda: ours_gen(1),
                              "hf_n": lambda: hf_gen(new), "hf_1": lambda: hf_gen(1)}, warmup=1, repeats=repeats)
    load = interleaved({"ours": lambda: models.from_pretrained(folder),
                        "hf": lambda: transformers.AutoModelForCausalLM.from_pretrained(folder)},
                       warmup=1, repeats=repeats)

    tokens = ids.numel()
    per_token = lambda who: (decode[f"{who}_n"][0] - decode[f"{who}_1"][0]) / (new - 1)
    rows = [
        dict(metric="prefill_tokens_per_s", ours=tokens / prefill["ours"][0] * 1e3,
             transformers=tokens / prefill["hf"][0] * 1e3,
             ours_ms_p20_p80=prefill["ours"][1:], transformers_ms_p20_p80=prefill["hf"][1:], tokens=tokens),
        dict(metric="decode_ms_per_token", ours=per_token("ours"), transformers=per_token("hf"),
             prompt=lengths["prompt"], new_tokens=new),
        dict(metric="load_ms", ours=load["ours"][0], transformers=load["hf"][0],
             ours_ms_p20_p80=load["ours"][1:], transformers_ms_p20_p80=load["hf"][1:]),
    ]
    rows[0]["ratio"] = rows[0]["ours"] / rows[0]["transformers"]
    for row in rows[1:]:
        row["ratio"] = row["transformers"] / row["ours"]  # times: > 1 means ours is faster
    for row in rows:
        row.update(model=kind, shape=shape, dtype="float32")
    return rows, diff


def lora_step_row(transformers, kind: str, mode: str, repeats: int) -> dict:
    import peft

    times, loss_diff, ids, lora = train_step_times(transformers, peft, kind, mode, repeats)
    return dict(metric="lora_train_step_ms", ours=times["ours"][0], transformers=times["peft"][0],
                ours_ms_p20_p80=times["ours"][1:], transformers_ms_p20_p80=times["peft"][1:],
                ratio=times["peft"][0] / times["ours"][0], batch=list(ids.shape), lora=lora, model=kind,
                max_loss_diff=loss_diff, shape=DECODER_SHAPES[kind][mode], dtype="float32")


def main(argv=None):
    args, mode, repeats = cpu_comparison_args(__doc__.splitlines()[0], "model_cpu", "repeats", 5, argv)
    import transformers

    rows, diff = decoder_rows(transformers, args.model, mode, repeats)
    if args.model == "gpt2":
        rows.append(t5_generation(transformers, mode, repeats))
    if args.model == "llama":
        rows.append(lora_step_row(transformers, args.model, mode, repeats))
    shape = DECODER_SHAPES[args.model][mode]
    info = {**run_info(), "transformers": transformers.__version__, "mode": mode, "shape": str(shape),
            "max_abs_logit_diff": f"{diff:.2e}", "repeats": str(repeats)}
    write_json(args.json, info, rows)

    also = f" and T5 {T5_SHAPES[mode]}" if args.model == "gpt2" else ""
    print(f"{args.model} {mode} {shape}{also}, fp32, {args.threads} threads, {info['device']}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; max |logit diff| {diff:.1e}")
    print(f"{'metric':<24}{'ours':>12}{'transformers':>14}{'ratio':>8}")
    for row in rows:
        print(f"{row['metric']:<24}{row['ours']:>12.2f}{row['transformers']:>14.2f}{row['ratio']:>8.2f}")
    print("ours vs transformers (>1 = ours faster): " + ", ".join(f"{HEADLINES[row['metric']]} {row['ratio']:.2f}x"
                                                               for row in rows))
    return rows


if __name__ == "__main__":
    main()
