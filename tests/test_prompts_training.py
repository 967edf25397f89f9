"""Prompt tuning learns: on a frozen random tiny GPT-2, a few seconds of AdamW on the soft prompt alone bring
a generated classification task's loss well below where it started (a smoke test of the whole path:
prompt encoder, concatenation, label padding, backward into the prompt)."""
import torch

from lowrank import PromptTuningConfig, get_peft_model

from .helpers import tiny_gpt2

SEP, CLASSES = 1, (42, 43)


def classification_batch(g, rows=32, length=5):
    """Random tokens 2..41, SEP, then the class token: CLASSES[first token is even]. Loss on the class only."""
    tokens = torch.randint(2, 42, (rows, length), generator=g)
    label = torch.where(tokens[:, :1] % 2 == 0, CLASSES[1], CLASSES[0])
    ids = torch.cat([tokens, torch.full((rows, 1), SEP), label], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = label[:, 0]
    return ids, labels


def test_prompt_tuning_halves_the_loss_of_a_frozen_model_within_a_few_seconds():
    model = get_peft_model(tiny_gpt2(initializer_range=0.3),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        ids, labels = classification_batch(g)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    end = sum(losses[-5:]) / 5
    assert end < 0.5 * losses[0], (losses[0], end)
