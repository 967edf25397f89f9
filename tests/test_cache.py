"""Properties of models.cache: KVCache holds exactly what was written, grows without losing it, and stops at
max_length; ConcatCache extends a given past by concatenation; T5 decodes one step per token with it."""
import pytest
import torch

from lowrank.models import ConcatCache, KVCache

from .helpers import tiny_t5


def _kv(layers, batch, heads, t, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, t, dim, generator=g), torch.randn(batch, heads, t, dim, generator=g))
            for _ in range(layers)]


@pytest.mark.parametrize("chunks", [[1], [3, 1, 1], [5, 70, 1], [1] * 9])
def test_kv_cache_holds_every_write_in_order_across_growth(chunks):
    cache = KVCache(2, 3, 2, 4, capacity=4, dtype=torch.float32, device="cpu")
    written = [_kv(2, 3, 2, n, 4, seed) for seed, n in enumerate(chunks)]
    for step in written:
        cache.reserve(step[0][0].shape[2])
        for layer, (k, v) in enumerate(step):
            held_k, held_v = cache.update(layer, k, v)  # everything so far, the new tokens included
        cache.advance(step[0][0].shape[2])
    for layer in range(2):
        for i, held in enumerate((cache.k, cache.v)):
            assert torch.equal(held[layer, :, :, : cache.length], torch.cat([s[layer][i] for s in written], dim=2))
    assert torch.equal(held_k, cache.k[1, :, :, : cache.length])
    assert cache.length == sum(chunks) <= cache.k.shape[3]


def test_kv_cache_grows_no_further_than_max_length():
    cache = KVCache(1, 1, 1, 2, capacity=4, dtype=torch.float32, device="cpu", max_length=6)
    cache.advance(4)
    cache.reserve(2)
    assert cache.k.shape[3] == 6


def test_kv_cache_load_takes_a_prefix_and_keeps_the_padding_mask():
    prefix = _kv(2, 2, 3, 5, 4, 0)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = KVCache(2, 2, 3, 4, capacity=8, dtype=torch.float32, device="cpu", key_mask=mask)
    cache.load(prefix)
    assert cache.length == 5 and torch.equal(cache.k[1, :, :, :5], prefix[1][0])
    assert cache.key_mask[:, :5].equal(mask.bool()) and cache.key_mask[:, 5:].all()


def test_concat_cache_extends_the_given_past_and_names_a_wrong_layer_count():
    past = _kv(2, 1, 2, 3, 4, 1)
    cache = ConcatCache(past, 2)
    new = _kv(2, 1, 2, 2, 4, 2)
    k, v = cache.update(0, *new[0])
    assert cache.length == 3 and torch.equal(k, torch.cat([past[0][0], new[0][0]], dim=2))
    with pytest.raises(ValueError, match="past_key_values has 2 layers, the model has 3"):
        ConcatCache(past, 3)


def test_t5_decodes_one_step_per_token_without_the_encoder_or_new_cross_projections(monkeypatch):
    model = tiny_t5()
    ids = torch.randint(0, 64, (2, 7))
    cache, _ = model.prefill(ids)
    calls = []
    monkeypatch.setattr(model.encoder, "forward", lambda *a, **k: calls.append("encoder"))
    for block in model.decoder.block:
        monkeypatch.setattr(block.layer[1].EncDecAttention, "project_kv", lambda *a, **k: calls.append("cross"))
    for step in range(5):
        model.decode_step(cache, torch.tensor([3, 4]))
    assert calls == [] and cache.self_attention.length == 6
