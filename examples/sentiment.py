"""LoRA sequence classification (SEQ_CLS) on a tiny GPT-Neo, as the PEFT-from-scratch notebook does with
gpt-neo-125m on IMDB, on reviews made here.

A tiny GPT-Neo causal LM (random weights, word-level tokenizer, both built here) is saved and loaded back
with models.from_pretrained(task_type="SEQ_CLS"), which gives it a new `score` head, as
AutoModelForSequenceClassification does. LoRA on q_proj/v_proj (PEFT's default for gpt_neo) with
task_type="SEQ_CLS" trains the adapters and the score head, on short "reviews" whose sentiment words decide
their label. Printed: eval accuracy before and after, and that the saved adapter (with its score head)
reloads exactly.

    python examples/sentiment.py [--smoke] [--out FOLDER]
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.common, from the checkout

import torch  # noqa: E402

from examples.common import out_dir, parse_args, plot_losses, vocab_size, write_jsonl  # noqa: E402
from lowrank import LoraConfig, PeftModel, get_peft_model, models  # noqa: E402
from lowrank.data import class_labels, classification_examples, label_maps  # noqa: E402
from lowrank.models import word_tokenizer  # noqa: E402
from lowrank.train import TrainingConfig, train  # noqa: E402

POSITIVE = ["great", "fun", "moving", "brilliant", "charming", "superb"]
NEGATIVE = ["awful", "boring", "dull", "clumsy", "tedious", "bland"]
FILLER = ["the", "film", "was", "and", "plot", "acting", "a", "story", "really", "quite", "its", "cast"]


def review(rng: random.Random) -> dict:
    """A few filler words around two sentiment words of one side: {"text", "label"}."""
    label = rng.choice(["negative", "positive"])
    words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
    rng.shuffle(words)
    return {"text": " ".join(words), "label": label}


def tiny_gpt_neo_folder(tokenizer, folder: Path, seed=0) -> Path:
    """A random tiny GPT-Neo causal LM (global and local layers) saved to `folder`, with the tokenizer."""
    torch.manual_seed(seed)
    model = models.GPTNeoForCausalLM(models.GPTNeoConfig(
        vocab_size=vocab_size(tokenizer), hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=32,
        attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=1, eos_token_id=1, pad_token_id=0))
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def accuracy(model, examples: list) -> float:
    """Fraction of examples whose argmax logit is the label (one right-padded batch)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] for e in examples])
    return (model(ids, attention_mask=(ids != 0).long()).logits.argmax(-1) == labels).float().mean().item()


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    folder = out_dir(args, "sentiment")
    tokenizer = word_tokenizer(POSITIVE + NEGATIVE + FILLER, folder / "base")
    rng = random.Random(0)
    train_file = write_jsonl(folder / "train.jsonl", [review(rng) for _ in range(400)])
    eval_file = write_jsonl(folder / "eval.jsonl", [review(rng) for _ in range(100)])
    classes = class_labels(train_file)
    train_data, eval_data = (classification_examples(f, tokenizer, max_length=16, labels=classes)
                             for f in (train_file, eval_file))

    tiny_gpt_neo_folder(tokenizer, folder / "base")
    base = models.from_pretrained(folder / "base", task_type="SEQ_CLS", num_labels=len(classes))
    base.config.extra.update(label_maps(classes))
    accuracy_before = accuracy(base, eval_data)
    peft = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16))
    peft.print_trainable_parameters()
    config = TrainingConfig(output_dir=str(folder / "adapter"), max_steps=8 if args.smoke else 200, batch_size=16,
                            learning_rate=5e-3, warmup_steps=10, lr_scheduler_type="cosine", progress=False, device="cpu")
    trainer = train(peft, train_data, config, eval_data=eval_data, pad_token_id=tokenizer.pad_token_id)
    metrics = trainer.evaluate()
    peft.eval()
    accuracy_after = accuracy(peft, eval_data)
    print(f"classes: {dict(enumerate(classes))}")
    print(f"eval accuracy on {len(eval_data)} held-out reviews: {accuracy_before:.2f} -> {accuracy_after:.2f} "
          f"(Trainer.evaluate: {metrics['accuracy']:.2f}, eval loss {metrics['eval_loss']:.3f})")

    reloaded = PeftModel.from_pretrained(
        models.from_pretrained(folder / "base", task_type="SEQ_CLS", num_labels=len(classes)), folder / "adapter")
    probe = torch.tensor([e["input_ids"] for e in eval_data[:1]])
    with torch.no_grad():
        reload_equal = torch.equal(reloaded.eval()(probe).logits, peft(probe).logits)
    print(f"adapter and score head saved to {folder / 'adapter'} and reloaded: logits bit-identical {reload_equal}")
    plot_losses({"LoRA SEQ_CLS (q_proj, v_proj, score)": trainer.history}, folder / "sentiment_loss.png",
                "tiny GPT-Neo: sentiment classification")
    return {"accuracy_before": accuracy_before, "accuracy_after": accuracy_after, "reload_equal": reload_equal,
            "eval_accuracy": metrics["accuracy"]}


if __name__ == "__main__":
    main()
