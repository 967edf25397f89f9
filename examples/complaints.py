"""Prompt tuning with TEXT init on a tiny BLOOM, generating label words, as PEFT's prompt-tuning guide does
with bloomz-560m on twitter complaints, on tweets made here.

A tiny BLOOM (random weights, word-level tokenizer, both built here) is first trained in full to answer
"Tweet text : ... Label :" with "yes" or "no", and the same tweets after the instruction "Is this tweet a
complaint :" with "complaint" or "no complaint". Prompt tuning (PromptTuningConfig, TEXT init from PEFT's
"Classify if the tweet is a complaint or not :" read through the tokenizer folder, 8 virtual tokens, every
model weight frozen) then makes the plain "Tweet text : ... Label :" format answer in those label words.
Printed: exact-match accuracy of the greedy label without a prompt, with the TEXT-initialised prompt and
after training it, a few generations, and that the saved prompt reloads exactly.

    python examples/complaints.py [--smoke] [--out FOLDER]
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.common, from the checkout

import torch  # noqa: E402

from examples.common import exact_match, generate_text, out_dir, parse_args, plot_losses, vocab_size, write_jsonl  # noqa: E402
from lowrank import PeftModel, PromptTuningConfig, get_peft_model, models  # noqa: E402
from lowrank.data import causal_lm_examples  # noqa: E402
from lowrank.models import word_tokenizer  # noqa: E402
from lowrank.train import TrainingConfig, train  # noqa: E402

LABEL_WORDS = ("no complaint", "complaint")
INIT_TEXT = "Classify if the tweet is a complaint or not :"
COMPLAINING = ["delayed", "broken", "refund", "worst", "rude", "lost", "cancelled", "waiting"]
CONTENT = ["thanks", "love", "great", "helpful", "quick", "friendly", "happy", "smooth"]
FILLER = ["my", "flight", "order", "the", "service", "today", "again", "your", "team", "app", "is", "was"]
FORMAT = ["Tweet", "text", ":", "Label", "yes", "no", "complaint", "Classify", "if", "tweet", "a", "or", "not",
          "Is", "this"]


def tweet(rng: random.Random) -> tuple:
    """(words, is_complaint): filler around two words of one side."""
    complaint = rng.random() < 0.5
    words = rng.sample(FILLER, 4) + rng.sample(COMPLAINING if complaint else CONTENT, 2)
    rng.shuffle(words)
    return " ".join(words), complaint


def rows(n: int, seed: int, words: tuple, instruction: str = "") -> list:
    """n prompt/completion rows: "<instruction> Tweet text : <tweet> Label :" -> words[1] if a complaint else
    words[0]."""
    rng = random.Random(seed)
    return [{"prompt": f"{instruction} Tweet text : {text} Label :".lstrip(), "completion": words[complaint]}
            for text, complaint in (tweet(rng) for _ in range(n))]


def tiny_bloom(tokenizer, seed=0) -> models.BloomForCausalLM:
    torch.manual_seed(seed)
    return models.BloomForCausalLM(models.BloomConfig(
        vocab_size=vocab_size(tokenizer), hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0))


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    folder = out_dir(args, "complaints")
    tokenizer = word_tokenizer(FORMAT + COMPLAINING + CONTENT + FILLER, folder / "base")
    fast = dict(progress=False, device="cpu", batch_size=16, warmup_steps=5, lr_scheduler_type="cosine")

    base = tiny_bloom(tokenizer)
    pretraining_rows = rows(800, 0, ("no", "yes")) + rows(800, 3, LABEL_WORDS, "Is this tweet a complaint :")
    pretraining_data = causal_lm_examples(write_jsonl(folder / "pretraining.jsonl", pretraining_rows), tokenizer, 32)
    pretraining = train(base, pretraining_data,
                        TrainingConfig(max_steps=10 if args.smoke else 300, learning_rate=3e-3, **fast),
                        pad_token_id=tokenizer.pad_token_id).history
    base.eval().save_pretrained(folder / "base")

    eval_rows = rows(64, 2, LABEL_WORDS)
    eval_pairs = [(r["prompt"], r["completion"]) for r in eval_rows]
    shown = [p for p, _ in eval_pairs[:3]]
    accuracy_before = exact_match(base, tokenizer, eval_pairs)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=str(folder / "base"))
    peft = get_peft_model(base, config)
    peft.print_trainable_parameters()
    accuracy_init = exact_match(peft, tokenizer, eval_pairs)
    train_file = write_jsonl(folder / "complaints.jsonl", rows(400, 1, LABEL_WORDS))
    trainer = train(peft, causal_lm_examples(train_file, tokenizer, 24),
                    TrainingConfig(output_dir=str(folder / "prompt"), max_steps=10 if args.smoke else 300,
                                   learning_rate=3e-2, **fast),
                    eval_data=causal_lm_examples(write_jsonl(folder / "eval.jsonl", eval_rows), tokenizer, 24),
                    pad_token_id=tokenizer.pad_token_id)
    peft.eval()
    accuracy_after = exact_match(peft, tokenizer, eval_pairs)
    print(f"exact-match label accuracy on {len(eval_pairs)} held-out tweets: no prompt {accuracy_before:.2f}, "
          f"TEXT-initialised prompt {accuracy_init:.2f}, trained prompt {accuracy_after:.2f}")
    for prompt, label, got in zip(shown, [c for _, c in eval_pairs], generate_text(peft, tokenizer, shown, 3)):
        print(f"  {prompt!r}: {got!r} (label {label!r})")

    reloaded = PeftModel.from_pretrained(models.from_pretrained(folder / "base"), folder / "prompt").eval()
    batch = tokenizer(shown, padding_side="left")
    with torch.no_grad():
        reload_equal = torch.equal(reloaded(**batch).logits, peft(**batch).logits)
    print(f"prompt saved to {folder / 'prompt'} and reloaded: logits bit-identical {reload_equal}")
    plot_losses({"pretraining (yes/no), all weights": pretraining, "prompt tuning (complaint words)": trainer.history},
                folder / "complaints_loss.png", "tiny BLOOM: prompt tuning with TEXT init")
    return {"accuracy_before": accuracy_before, "accuracy_init": accuracy_init, "accuracy_after": accuracy_after, "reload_equal": reload_equal}


if __name__ == "__main__":
    main()
