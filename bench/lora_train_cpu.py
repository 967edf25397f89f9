"""Is a LoRA training step here at least as fast as peft + transformers on a CPU, for the same work?

    step: loss = model(input_ids, labels).loss; loss.backward(); AdamW step; zero_grad  -> ms, tokens/s

GPT-2-small-shaped random weights (no download; --model llama: SmolLM-135M's shape, and so on for each
model type of bench/common.DECODER_SHAPES), fp32, dropout 0, LoRA r=8, alpha 16 on TARGETS[model] (GPT-2:
c_attn; Llama: all seven linears). peft creates the adapter; ours loads the same adapter file (is_trainable=True), so both start from the
same weights and see the same batches. Steps run interleaved (alternating order each repeat) after a
warm-up; figures are medians with p20/p80. The losses are checked to agree before and after timing.

Prints a table whose last line is the headline ratio (> 1: ours is faster) and writes JSON rows.
Usage: python bench/lora_train_cpu.py [--model TYPE] [--quick] [--threads N] [--repeats R] [--json PATH]
"""
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lowrank  # noqa: E402
from lowrank import models  # noqa: E402
from bench.common import DECODER_SHAPES, cpu_comparison_args, interleaved, run_info, write_json  # noqa: E402

BATCH = {"full": (2, 128), "quick": (2, 32)}
TARGETS = {"gpt2": ["c_attn"], "gpt_neo": ["q_proj", "v_proj"], "bloom": ["query_key_value"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "gpt_neo": dict(resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0),
              "bloom": dict(hidden_dropout=0.0, attention_dropout=0.0), "llama": dict(attention_dropout=0.0)}


def trainer(model, ids):
    """A closure running one training step of `model` on ids (B, T); returns the loss before the step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train_step_times(transformers, peft, kind: str, mode: str, repeats: int) -> tuple:
    """({"ours": [median, p20, p80] ms, "peft": ...}, max |loss difference|, ids, LoRA kwargs) of interleaved
    training steps, ours and peft's, from the same random `kind` model and the same adapter file."""
    shape, (batch, length) = DECODER_SHAPES[kind][mode], BATCH[mode]
    lora = dict(r=8, lora_alpha=16, target_modules=TARGETS[kind])
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **shape, **NO_DROPOUT[kind], bos_token_id=0, eos_token_id=0)
    folder = tempfile.mkdtemp(prefix="lora_train_cpu_")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(f"{folder}/base")
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(f"{folder}/base").train(),
                                 peft.LoraConfig(**lora, task_type="CAUSAL_LM"))
    theirs.save_pretrained(f"{folder}/adapter")
    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(f"{folder}/base").train(), f"{folder}/adapter",
                                             is_trainable=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    ids = torch.randint(0, shape["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))
    steps = {"ours": trainer(ours, ids), "peft": trainer(theirs, ids)}
    losses = {name: [] for name in steps}
    timed = {name: (lambda name=name: losses[name].append(steps[name]())) for name in steps}
    times = interleaved(timed, warmup=2, repeats=repeats)
    # Same weights, data and step count, so the loss trajectories must agree to fp32 rounding.
    loss_diff = max(abs(a - b).item() for a, b in zip(losses["ours"], losses["peft"]))
    if loss_diff > 1e-3 * abs(losses["peft"][0].item()):
        raise SystemExit(f"losses disagree: {losses}")
    return times, loss_diff, ids, lora


def main(argv=None):
    args, mode, repeats = cpu_comparison_args(__doc__.splitlines()[0], "lora_train_cpu", "steps", 7, argv)
    import peft
    import transformers

    warnings.filterwarnings("ignore", category=UserWarning)  # peft's fan_in_fan_out note on Conv1D targets
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations inside peft
    times, loss_diff, ids, lora = train_step_times(transformers, peft, args.model, mode, repeats)
    shape, (batch, length) = DECODER_SHAPES[args.model][mode], ids.shape

    tokens = ids.numel()
    rows = [dict(impl=name, median_ms=t[0], p20_ms=t[1], p80_ms=t[2], tokens_per_s=tokens / t[0] * 1e3,
                 batch=batch, seq=length, model=args.model, shape=shape, dtype="float32", lora=lora)
            for name, t in times.items()]
    ratio = times["peft"][0] / times["ours"][0]
    info = {**run_info(), "transformers": transformers.__version__, "peft": peft.__version__, "mode": mode,
            "repeats": str(repeats), "max_loss_diff": f"{loss_diff:.2e}", "speed_ratio_ours_over_peft": f"{ratio:.3f}"}
    write_json(args.json, info, rows)

    print(f"LoRA train step, {args.model} {mode} {shape}, batch {batch}x{length}, fp32, r=8 on {lora['target_modules']}, "
          f"{args.threads} threads, "
          f"{info['device']}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"max |loss diff| {loss_diff:.1e}")
    print(f"{'impl':<8}{'median ms':>12}{'p20 ms':>10}{'p80 ms':>10}{'tokens/s':>10}")
    for row in rows:
        print(f"{row['impl']:<8}{row['median_ms']:>12.1f}{row['p20_ms']:>10.1f}{row['p80_ms']:>10.1f}{row['tokens_per_s']:>10.1f}")
    print(f"ours vs peft (>1 = ours faster): {ratio:.2f}x")
    return rows


if __name__ == "__main__":
    main()
