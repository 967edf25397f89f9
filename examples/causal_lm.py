"""LoRA on a tiny GPT-2, end to end on local data.

A GPT-2 with a word-level tokenizer (both built here) is pretrained briefly to count up ("up : 3 4 5" ->
"6 7 8 9"). LoRA then teaches it to count down from prompt/completion pairs read from a jsonl file
(loss on the completion only). Printed: eval loss and exact-match accuracy before and after, a few
generations, that the merged model gives the unmerged outputs, and that the saved adapter reloads exactly.

    python examples/causal_lm.py [--smoke] [--out FOLDER]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.common, from the checkout

import torch  # noqa: E402

from examples.common import (counting_data, counting_pairs, counting_words, exact_match,  # noqa: E402
                             generate_text, out_dir, parse_args, plot_losses, pretrain_gpt2)
from lowrank import LoraConfig, PeftModel, get_peft_model, models  # noqa: E402
from lowrank.models import word_tokenizer  # noqa: E402
from lowrank.train import TrainingConfig, train  # noqa: E402


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    folder = out_dir(args, "causal_lm")
    tokenizer = word_tokenizer(counting_words(), folder / "base")
    base, pretrain_history = pretrain_gpt2(tokenizer, steps=20 if args.smoke else 300)
    base.save_pretrained(folder / "base")  # with tokenizer.json: a checkpoint the `lowrank` command takes

    train_data, eval_data = (counting_data("down", n, seed, tokenizer, folder) for n, seed in ((400, 1), (64, 2)))
    eval_pairs = counting_pairs("down", 64, 2)
    shown = list(dict.fromkeys(p for p, _ in eval_pairs))[:3]

    accuracy_before = exact_match(base, tokenizer, eval_pairs)
    before = generate_text(base, tokenizer, shown, 5)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                           fan_in_fan_out=True, task_type="CAUSAL_LM"))
    peft.print_trainable_parameters()
    config = TrainingConfig(output_dir=str(folder / "adapter"), max_steps=10 if args.smoke else 150, batch_size=16,
                            learning_rate=5e-3, warmup_steps=10, lr_scheduler_type="cosine", progress=False, device="cpu")
    trainer = train(peft, train_data, config, eval_data=eval_data, pad_token_id=tokenizer.pad_token_id)
    with peft.disable_adapter():
        loss_before = trainer.evaluate()["eval_loss"]
    metrics = trainer.history[-1]
    accuracy_after = exact_match(peft, tokenizer, eval_pairs)
    after = generate_text(peft, tokenizer, shown, 5)
    print(f"eval loss: {loss_before:.3f} -> {metrics['eval_loss']:.3f} (perplexity {metrics['perplexity']:.2f})")
    print(f"exact-match accuracy on {len(eval_pairs)} held-out prompts: {accuracy_before:.2f} -> {accuracy_after:.2f}")
    for prompt, b, a in zip(shown, before, after):
        print(f"  {prompt!r}: before {b!r}, after {a!r}")

    peft.eval()
    ids = tokenizer([p for p, _ in eval_pairs[:8]], padding_side="left")
    with torch.no_grad():
        unmerged = peft(**ids).logits
        reloaded = PeftModel.from_pretrained(models.from_pretrained(folder / "base"), folder / "adapter").eval()
        reload_equal = torch.equal(reloaded(**ids).logits, unmerged)
        merged = reloaded.merge_and_unload()(**ids).logits
    merge_diff = (merged - unmerged).abs().max().item()
    print(f"adapter saved to {folder / 'adapter'} and reloaded: logits bit-identical {reload_equal}")
    print(f"merged vs unmerged logits: max |difference| {merge_diff:.2e}")
    plot_losses({"pretraining (count up), all weights": pretrain_history, "LoRA (count down)": trainer.history},
                folder / "causal_lm_loss.png", "tiny GPT-2: pretraining, then LoRA")
    return {"accuracy_before": accuracy_before, "accuracy_after": accuracy_after, "reload_equal": reload_equal,
            "merge_diff": merge_diff, "eval_loss": metrics["eval_loss"], "eval_loss_before": loss_before}


if __name__ == "__main__":
    main()
