"""What the examples share: tiny GPT-2 and T5 models, the generated counting tasks, exact-match scoring by
greedy generation, a loss-curve PNG, and the command line.

Nothing here downloads anything: the tokenizer is lowrank.models.word_tokenizer on the task's words, and
every corpus is generated.
"""
import argparse
import json
import random
from pathlib import Path

import torch

from lowrank import models
from lowrank.data import causal_lm_examples
from lowrank.train import TrainingConfig, train


def vocab_size(tokenizer) -> int:
    return tokenizer.tokenizer.get_vocab_size()


def tiny_gpt2(tokenizer, n_embd=64, n_layer=2, n_positions=32, seed=0) -> models.GPT2LMHeadModel:
    """A random GPT-2 sized for the tokenizer, without dropout (the runs are short and exact)."""
    torch.manual_seed(seed)
    return models.GPT2LMHeadModel(models.GPT2Config(
        vocab_size=vocab_size(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=n_positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0))


def tiny_t5(tokenizer, d_model=64, num_layers=2, seed=0) -> models.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return models.T5ForConditionalGeneration(models.T5Config(
        vocab_size=vocab_size(tokenizer), d_model=d_model, d_kv=16, d_ff=128, num_layers=num_layers,
        num_heads=4, dropout_rate=0.0))


# -- generated counting tasks: "<task> : a b c" -> the next numbers --

NUMBERS = [str(i) for i in range(40)]
STEPS = {"up": 1, "down": -1, "twos": 2}


def counting_words():
    return [*STEPS, ":", *NUMBERS]


def counting_example(task: str, rng: random.Random, shown=3, predicted=4) -> tuple:
    """(prompt, completion), e.g. ("down : 17 16 15", "14 13 12 11"): continue the sequence by STEPS[task]."""
    step, length = STEPS[task], shown + predicted
    low = max(0, -step * (length - 1))
    start = rng.randrange(low, len(NUMBERS) - max(0, step * (length - 1)))
    seq = [str(start + step * i) for i in range(length)]
    return f"{task} : " + " ".join(seq[:shown]), " ".join(seq[shown:])


def counting_pairs(task: str, n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [counting_example(task, rng) for _ in range(n)]


def write_jsonl(path, rows: list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def counting_data(task: str, n: int, seed: int, tokenizer, folder) -> list:
    """n prompt/completion pairs of `task` written to folder/<task>_<seed>.jsonl and read back as causal-LM
    examples (loss on the completion and EOS only) by lowrank.data."""
    rows = [{"prompt": p, "completion": c} for p, c in counting_pairs(task, n, seed)]
    path = write_jsonl(Path(folder) / f"{task}_{seed}.jsonl", rows)
    return causal_lm_examples(path, tokenizer, max_length=32)


def pretrain_gpt2(tokenizer, steps: int, seed=0):
    """A tiny GPT-2 trained in full (all parameters) on counting up: (model, loss history)."""
    pairs = counting_pairs("up", 2000, seed)
    data = [{"input_ids": ids, "labels": ids}
            for ids in (tokenizer.encode(f"{p} {c}") + [tokenizer.eos_token_id] for p, c in pairs)]
    model = tiny_gpt2(tokenizer, seed=seed)
    trainer = train(model, data, TrainingConfig(max_steps=steps, batch_size=32, learning_rate=3e-3, warmup_steps=10,
                                                seed=seed, progress=False, device="cpu"),
                    pad_token_id=tokenizer.pad_token_id)
    return trainer.model.eval(), trainer.history


@torch.no_grad()
def generate_text(model, tokenizer, prompts: list, max_new_tokens: int, adapter_names=None) -> list:
    """Greedy completions of `prompts` (one left-padded batch), decoded without the prompt."""
    batch = tokenizer(prompts, padding_side="left")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         **({} if adapter_names is None else {"adapter_names": adapter_names}))
    new = out[:, model.generation_prefix(batch["input_ids"]).shape[1]:]
    return [tokenizer.decode(row) for row in new]


def exact_match(model, tokenizer, pairs: list, adapter_names=None) -> float:
    """Fraction of (prompt, answer) pairs whose greedy completion is exactly the answer."""
    width = max(len(tokenizer.encode(a)) for _, a in pairs) + 1
    got = generate_text(model, tokenizer, [p for p, _ in pairs], width, adapter_names)
    return sum(g == a for g, (_, a) in zip(got, pairs)) / len(pairs)


# -- command line and results --

def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that takes seconds (for tests)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG and files (default examples/out/<name>)")
    return parser.parse_args(argv)


def out_dir(args, name: str) -> Path:
    folder = args.out or Path(__file__).parent / "out" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def plot_losses(curves: dict, path, title: str) -> Path:
    """curves: {label: history (entries with "step" and "loss")} -> one PNG of training loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in curves.items():
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=label)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"loss curve: {path}")
    return Path(path)

