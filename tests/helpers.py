"""What many test files share: tolerances by dtype, a relative closeness check, tiny models."""
import torch

from lowrank import models

# Relative tolerances by dtype; tests scale them by the magnitude of the reference.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


def assert_close_rel(actual, expected, dtype=torch.float32, rtol=None, scale=None):
    """|actual - expected| <= rtol * (|expected| + scale) elementwise, compared in float64.

    rtol defaults to TOLERANCE[dtype]; scale defaults to max|expected|, so that entries near zero need not
    match exactly. Pass the magnitude of the summed terms as scale where the result cancels them out.
    """
    rtol = TOLERANCE[dtype] if rtol is None else rtol
    expected = expected.double()
    scale = expected.abs().max().item() if scale is None else scale
    atol = rtol * max(scale, 1e-6)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def tiny_gpt2(seed=0, **overrides) -> models.GPT2LMHeadModel:
    """A random 2-layer GPT-2 (C=32, 4 heads, vocab 64), in eval mode."""
    torch.manual_seed(seed)
    config = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, eos_token_id=None)
    return models.GPT2LMHeadModel(models.GPT2Config(**{**config, **overrides})).eval()


def tiny_t5(seed=0, **overrides) -> models.T5ForConditionalGeneration:
    """A random 2-layer T5 (d_model=32, 4 heads, vocab 64), in eval mode."""
    torch.manual_seed(seed)
    config = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return models.T5ForConditionalGeneration(models.T5Config(**{**config, **overrides})).eval()


def train_steps(model, steps: int, lr: float, **batch) -> None:
    """`steps` Adam steps on the model's trainable parameters over one batch (the model's own loss), then eval mode."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


def returned_cache(output):
    """A transformers output's KV cache: `cache` from 5.24, `past_key_values` before."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


def left_padded(lengths, generator, high: int) -> tuple:
    """(ids (B, max(lengths)) of random tokens in [0, high), mask (B, max(lengths)): 1 on each row's last
    lengths[i] columns)."""
    width = max(lengths)
    ids = torch.randint(0, high, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids, mask
