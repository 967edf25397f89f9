"""Two LoRA adapters, two tasks, one frozen base, one mixed batch.

A tiny GPT-2 pretrained to count up gets two adapters: "down" (count down) and "twos" (count up in
steps of two), each trained with the other inactive. The adapters are then switched per call with
set_adapter, and finally served together: one batch whose rows name their adapter (adapter_names=[...]
in forward and generate), "__base__" for rows that take the base model alone.

    python examples/multi_task.py [--smoke] [--out FOLDER]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.common, from the checkout

import torch  # noqa: E402

from examples.common import (counting_data, counting_pairs, counting_words, exact_match,  # noqa: E402
                             generate_text, out_dir, parse_args, plot_losses, pretrain_gpt2)
from lowrank import LoraConfig, get_peft_model  # noqa: E402
from lowrank.lora import BASE  # noqa: E402
from lowrank.models import word_tokenizer  # noqa: E402
from lowrank.train import TrainingConfig, train  # noqa: E402

TASKS = ("down", "twos")


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    folder = out_dir(args, "multi_task")
    tokenizer = word_tokenizer(counting_words(), folder / "tokenizer")
    base, pretrain_history = pretrain_gpt2(tokenizer, steps=20 if args.smoke else 300)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    peft = get_peft_model(base, lora, adapter_name=TASKS[0])
    peft.add_adapter(TASKS[1], lora)
    curves = {"pretraining (count up)": pretrain_history}
    for task in TASKS:
        peft.set_adapter(task)  # the other adapter is inactive and frozen while this one trains
        config = TrainingConfig(max_steps=10 if args.smoke else 150, batch_size=16, learning_rate=5e-3,
                                warmup_steps=10, progress=False, device="cpu")
        trainer = train(peft, counting_data(task, 400, 1, tokenizer, folder), config,
                        pad_token_id=tokenizer.pad_token_id)
        curves[f"LoRA '{task}'"] = trainer.history
    peft.eval()
    base_unchanged = all(torch.equal(frozen[k], v) for k, v in peft.get_base_model().state_dict().items()
                         if k in frozen)
    print(f"base weights bit-identical after training both adapters: {base_unchanged}")

    accuracy = {}
    for task in TASKS:
        peft.set_adapter(task)
        accuracy[task] = {t: exact_match(peft, tokenizer, counting_pairs(t, 32, seed=2)) for t in TASKS}
        print(f"adapter {task!r} active: exact match " + ", ".join(f"{t} {a:.2f}" for t, a in accuracy[task].items()))

    prompts = [counting_pairs(t, 1, seed=3)[0][0] for t in (*TASKS, "up")]
    names = [*TASKS, BASE]
    mixed = generate_text(peft, tokenizer, prompts, 4, adapter_names=names)
    print("one mixed batch, one adapter per row:")
    for prompt, name, text in zip(prompts, names, mixed):
        print(f"  [{name}] {prompt!r} -> {text!r}")
    batch = tokenizer(prompts, padding_side="left")
    with torch.no_grad():
        logits = peft(**batch, adapter_names=names).logits
        separate = []
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in batch.items()}
            if name == BASE:
                with peft.disable_adapter():
                    separate.append(peft(**row).logits)
            else:
                peft.set_adapter(name)
                separate.append(peft(**row).logits)
    mixed_diff = (logits - torch.cat(separate)).abs().max().item()
    print(f"mixed-batch logits vs one adapter per call: max |difference| {mixed_diff:.2e}")
    plot_losses(curves, folder / "multi_task_loss.png", "one base, two LoRA adapters")
    return {"accuracy": accuracy, "mixed": mixed, "mixed_diff": mixed_diff, "base_unchanged": base_unchanged}


if __name__ == "__main__":
    main()
