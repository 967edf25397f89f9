"""causal_lm_loss against a float64 NumPy next-token cross-entropy, ignored (-100) labels anywhere."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from lowrank.models.decoder import causal_lm_loss


def reference_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over positions t < T-1 whose label t+1 is not -100 of -log softmax(logits[b, t])[labels[b, t+1]]."""
    logits, targets = logits[:, :-1].astype(np.float64), labels[:, 1:]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    kept = targets != -100
    return float(-np.take_along_axis(log_probs, np.where(kept, targets, 0)[..., None], -1)[..., 0][kept].mean())


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(2, 9), vocab=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_loss_equals_reference(batch, length, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[torch.rand(batch, length, generator=generator) < 0.3] = -100
    labels[0, 1] = 0  # at least one position counts
    loss = causal_lm_loss(logits.requires_grad_(), labels)
    np.testing.assert_allclose(loss.item(), reference_loss(logits.detach().numpy(), labels.numpy()), rtol=1e-5)
    loss.backward()
    assert logits.grad[:, -1].abs().max() == 0  # the last position predicts nothing
