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


@torch.no_grad()
def greedy_by_forward(model, ids, mask, steps: int, eos=None, pad=0, position_ids=True, decoder_start=None):
    """A reference's greedy tokens without its `generate`: its forward over the whole sequence at every step
    (no cache), the argmax of the last logits appended, `steps` times or until every row has emitted eos
    (a finished row continues with pad).

    Decoder-only (decoder_start None): ids, mask (B, T) -> (B, T + n). Where the mask pads, position ids
    count real tokens from 0 (padding at 1), as transformers' generation sets them; position_ids=False for
    models that take positions from the mask alone (BLOOM's ALiBi). Encoder-decoder: ids, mask are the
    encoder's, and the result is the decoder's tokens (B, 1 + n) from decoder_start.
    """
    out = ids if decoder_start is None else torch.full((ids.shape[0], 1), decoder_start)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        if decoder_start is None:
            full = torch.cat([mask, mask.new_ones(mask.shape[0], out.shape[1] - ids.shape[1])], 1)
            extra = {}
            if position_ids and not bool(full.all()):
                extra["position_ids"] = (full.cumsum(-1) - 1).masked_fill(full == 0, 1)
            logits = model(input_ids=out, attention_mask=full, **extra).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits
        token = logits[:, -1].argmax(-1).masked_fill(finished, pad)
        if eos is not None:
            finished |= torch.isin(token, torch.as_tensor(eos))
        out = torch.cat([out, token[:, None]], dim=1)
        if finished.all():
            break
    return out
