"""Classification as text generation on a tiny T5: LoRA and prompt tuning, compared.

A T5 with a word-level tokenizer (both built here) is pretrained briefly to copy generated review
sentences. Each method then learns, from a csv file of (text, label) rows, to answer "positive" or
"negative" instead; printed are the eval loss and the held-out accuracy before and after each, and the
number of trained parameters.

    python examples/seq2seq.py [--smoke] [--out FOLDER]
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.common, from the checkout

from examples.common import exact_match, out_dir, parse_args, plot_losses, tiny_t5  # noqa: E402
from lowrank import LoraConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from lowrank.data import seq2seq_examples  # noqa: E402
from lowrank.models import word_tokenizer  # noqa: E402
from lowrank.train import TrainingConfig, train  # noqa: E402

GOOD = "good great lovely superb fine pleasant wonderful".split()
BAD = "bad awful boring poor dull terrible ugly".split()
NOUNS = "movie film song book meal trip show game".split()
LABELS = {"positive": GOOD, "negative": BAD}


def review(rng: random.Random) -> tuple:
    """(sentence, label), e.g. ("the song was really dull", "negative")."""
    label = rng.choice(sorted(LABELS))
    adverb = rng.choice(["", "really ", "very ", "quite "])
    return f"the {rng.choice(NOUNS)} was {adverb}{rng.choice(LABELS[label])}", label


def reviews(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def write_csv(path: Path, rows: list) -> Path:
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def pretrain_t5(tokenizer, steps: int):
    """A tiny T5 trained in full to copy sentences (labels included, so the decoder can write them)."""
    rows = [(text, text) for text, _ in reviews(1000, 0)] + [(f"the review is {w}", f"the review is {w}")
                                                             for w in LABELS]
    data = [{"input_ids": tokenizer.encode(s), "labels": tokenizer.encode(t)} for s, t in rows]
    trainer = train(tiny_t5(tokenizer), data, TrainingConfig(max_steps=steps, batch_size=32, learning_rate=3e-3,
                                                             warmup_steps=10, progress=False, device="cpu"),
                    pad_token_id=tokenizer.pad_token_id)
    return trainer.model.eval(), trainer.history


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    folder = out_dir(args, "seq2seq")
    words = ["the", "was", "really", "very", "quite", "review", "is", *NOUNS, *GOOD, *BAD, *LABELS]
    tokenizer = word_tokenizer(words, folder / "tokenizer", append_eos=True)
    steps = 20 if args.smoke else 300
    base, pretrain_history = pretrain_t5(tokenizer, steps)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    files = {split: write_csv(folder / f"reviews_{split}.csv", reviews(n, seed))
             for split, n, seed in (("train", 400, 1), ("eval", 64, 2))}
    data = {split: seq2seq_examples(file, tokenizer, max_length=16, source_column="text", target_column="label")
            for split, file in files.items()}
    eval_pairs = reviews(64, 2)
    accuracy_before = exact_match(base, tokenizer, eval_pairs)
    print(f"pretrained T5 (copies its input): accuracy {accuracy_before:.2f} on {len(eval_pairs)} held-out reviews")

    methods = {
        "LoRA (q, v, r=8)": (LoraConfig(r=8, lora_alpha=16, task_type="SEQ_2_SEQ_LM"), 3e-3),
        "prompt tuning (16 tokens)": (PromptTuningConfig(num_virtual_tokens=16, task_type="SEQ_2_SEQ_LM"), 0.3),
    }
    curves, results = {"pretraining (copy), all weights": pretrain_history}, {}
    for name, (config, lr) in methods.items():
        base.load_state_dict(state)
        peft = get_peft_model(base, config)
        trainable = peft.get_nb_trainable_parameters()[0]
        trainer = train(peft, data["train"], TrainingConfig(max_steps=10 if args.smoke else 200, batch_size=16,
                                                            learning_rate=lr, warmup_steps=10, progress=False,
                                                            device="cpu"),
                        eval_data=data["eval"], pad_token_id=tokenizer.pad_token_id)
        with peft.disable_adapter():
            loss_before = trainer.evaluate()["eval_loss"]
        accuracy = exact_match(peft.eval(), tokenizer, eval_pairs)
        print(f"{name}: {trainable:,d} trained parameters; eval loss {loss_before:.3f} -> "
              f"{trainer.history[-1]['eval_loss']:.3f}; accuracy {accuracy_before:.2f} -> {accuracy:.2f}")
        curves[name], results[name] = trainer.history, accuracy
        base = peft.unload()
    plot_losses(curves, folder / "seq2seq_loss.png", "tiny T5: copy pretraining, then classification")
    return {"accuracy_before": accuracy_before, "accuracy_after": results}


if __name__ == "__main__":
    main()
