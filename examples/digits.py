"""The classic MNIST LoRA experiment, on scikit-learn's 8x8 digits (no download).

Train a small MLP on all digits, find the digit it gets wrong most often, then LoRA-fine-tune the MLP's
three nn.Linear layers on that digit alone. Per-digit test errors before and after show the trade: the
weak digit improves, others may suffer. The base weights stay bit-identical, and disable_adapter() gives
the original model back.

    python examples/digits.py [--smoke] [--out FOLDER]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.common, from the checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

from examples.common import out_dir, parse_args, plot_losses  # noqa: E402
from lowrank import LoraConfig, get_peft_model  # noqa: E402


class MLP(nn.Module):
    """x: (B, 64) pixels in [0, 1] -> logits (B, 10)."""

    def __init__(self, hidden=128):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def fit(model, x, y, steps: int, lr: float, batch_size=64, seed=0) -> list:
    """Adam on the trainable parameters with random mini-batches; returns [{"step", "loss"}]."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(1, steps + 1):
        rows = torch.randint(len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item()})
    return history


@torch.no_grad()
def errors_per_digit(model, x, y) -> torch.Tensor:
    """(10,) count of wrong predictions for each true digit."""
    wrong = model(x).argmax(-1) != y
    return torch.bincount(y[wrong], minlength=10)


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    folder = out_dir(args, "digits")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in train_test_split(
        x.numpy(), y.numpy(), test_size=0.5, random_state=0, stratify=y.numpy()))

    torch.manual_seed(0)
    model = MLP()
    # A short first training leaves some digits clearly weaker than others, as in the MNIST original.
    base_history = fit(model, x_train, y_train, steps=20 if args.smoke else 150, lr=1e-3)
    before = errors_per_digit(model, x_test, y_test)
    worst = int(before.argmax())
    print(f"test errors per digit, base model:  {before.tolist()} (total {int(before.sum())} of {len(y_test)})")
    print(f"worst digit: {worst}")

    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"]))
    peft.print_trainable_parameters()
    only_worst = y_train == worst
    lora_history = fit(peft, x_train[only_worst], y_train[only_worst], steps=5 if args.smoke else 15, lr=1e-3,
                       batch_size=32)
    after = errors_per_digit(peft, x_test, y_test)
    print(f"test errors per digit, with LoRA:   {after.tolist()} (total {int(after.sum())})")
    print(f"digit {worst}: {int(before[worst])} -> {int(after[worst])} errors")

    unchanged = all(torch.equal(base_weights[k], v) for k, v in peft.get_base_model().state_dict().items()
                    if k in base_weights)
    print(f"base weights bit-identical after LoRA training: {unchanged}")
    with peft.disable_adapter():
        disabled = errors_per_digit(peft, x_test, y_test)
    print(f"adapter disabled: {disabled.tolist()} (equals the base model: {torch.equal(disabled, before)})")
    plot_losses({"MLP, all digits": base_history, f"LoRA, digit {worst} only": lora_history},
                folder / "digits_loss.png", "8x8 digits: MLP then LoRA on the worst digit")
    return {"worst": worst, "before": before, "after": after, "base_unchanged": unchanged,
            "disabled_equals_base": torch.equal(disabled, before)}


if __name__ == "__main__":
    main()
