"""LoRA on all seven linears of a tiny Llama, on an instruction-style jsonl made here.

A tiny Llama (grouped-query attention, random weights, word-level tokenizer, all built here) is first trained
in full on instructions to copy a list of words. LoRA on q/k/v/o_proj and gate/up/down_proj (every linear
the fused kernel serves) then teaches it to reverse them, from {"instruction", "response"} rows of a jsonl
file, the loss on the response only. Printed: exact-match accuracy before and after, a few generations,
that merge_and_unload gives the unmerged outputs, and that the saved adapter reloads exactly.

    python examples/instruct.py [--smoke] [--out FOLDER]
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.common, from the checkout

import torch  # noqa: E402

from examples.common import exact_match, generate_text, out_dir, parse_args, plot_losses, vocab_size, write_jsonl  # noqa: E402
from lowrank import LoraConfig, PeftModel, get_peft_model, models  # noqa: E402
from lowrank.data import causal_lm_examples  # noqa: E402
from lowrank.models import word_tokenizer  # noqa: E402
from lowrank.train import TrainingConfig, train  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "seed", "wheel", "cup", "moon", "fern", "drum"]
TASKS = {"copy": lambda items: items, "reverse": lambda items: items[::-1]}
FORMAT = ["###", "Instruction:", "Response:", "Input:", *TASKS]


def instruction_rows(task: str, n: int, seed: int) -> list:
    """n {"instruction", "response"} rows: "### Instruction: <task> ### Input: w1 w2 w3 ### Response:" ->
    the task applied to the words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        items = rng.sample(WORDS, rng.randint(2, 4))
        rows.append({"instruction": f"### Instruction: {task} ### Input: {' '.join(items)} ### Response:",
                     "response": " ".join(TASKS[task](items))})
    return rows


def tiny_llama(tokenizer, seed=0) -> models.LlamaForCausalLM:
    torch.manual_seed(seed)
    return models.LlamaForCausalLM(models.LlamaConfig(
        vocab_size=vocab_size(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
        pad_token_id=0))


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    folder = out_dir(args, "instruct")
    tokenizer = word_tokenizer(FORMAT + WORDS, folder / "base")
    examples = lambda task, n, seed: causal_lm_examples(  # noqa: E731
        write_jsonl(folder / f"{task}_{seed}.jsonl", instruction_rows(task, n, seed)), tokenizer, max_length=24,
        prompt_column="instruction", completion_column="response")
    fast = dict(progress=False, device="cpu", batch_size=16, warmup_steps=10, lr_scheduler_type="cosine")

    base = tiny_llama(tokenizer)
    pretraining = train(base, examples("copy", 1000, 0), TrainingConfig(max_steps=10 if args.smoke else 300,
                                                                        learning_rate=3e-3, **fast),
                        pad_token_id=tokenizer.pad_token_id).history
    base.eval().save_pretrained(folder / "base")

    eval_pairs = [(r["instruction"], r["response"]) for r in instruction_rows("reverse", 64, 2)]
    shown = [p for p, _ in eval_pairs[:3]]
    accuracy_before = exact_match(base, tokenizer, eval_pairs)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, task_type="CAUSAL_LM"))
    peft.print_trainable_parameters()
    trainer = train(peft, examples("reverse", 600, 1), TrainingConfig(output_dir=str(folder / "adapter"),
                                                                      max_steps=10 if args.smoke else 200,
                                                                      learning_rate=5e-3, **fast),
                    eval_data=examples("reverse", 64, 2), pad_token_id=tokenizer.pad_token_id)
    peft.eval()
    accuracy_after = exact_match(peft, tokenizer, eval_pairs)
    print(f"exact-match accuracy on {len(eval_pairs)} held-out instructions: {accuracy_before:.2f} -> {accuracy_after:.2f}")
    for prompt, answer, got in zip(shown, [a for _, a in eval_pairs], generate_text(peft, tokenizer, shown, 5)):
        print(f"  {prompt!r}: {got!r} (expected {answer!r})")

    batch = tokenizer(shown, padding_side="left")
    with torch.no_grad():
        unmerged = peft(**batch).logits
        reloaded = PeftModel.from_pretrained(models.from_pretrained(folder / "base"), folder / "adapter").eval()
        reload_equal = torch.equal(reloaded(**batch).logits, unmerged)
        merge_diff = (reloaded.merge_and_unload()(**batch).logits - unmerged).abs().max().item()
    print(f"adapter saved to {folder / 'adapter'} and reloaded: logits bit-identical {reload_equal}")
    print(f"merged vs unmerged logits: max |difference| {merge_diff:.2e}")
    plot_losses({"pretraining (copy), all weights": pretraining, "LoRA on all linears (reverse)": trainer.history},
                folder / "instruct_loss.png", "tiny Llama: instruction tuning with LoRA")
    return {"accuracy_before": accuracy_before, "accuracy_after": accuracy_after, "reload_equal": reload_equal,
            "merge_diff": merge_diff, "eval_loss": trainer.history[-1]["eval_loss"]}


if __name__ == "__main__":
    main()
