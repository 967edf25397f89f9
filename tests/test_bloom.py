"""Properties of models.bloom on its own: ALiBi slopes and positions, layout, config, the growing cache.

KV cache and padding: tests/test_decoder_cache.py, over every decoder.
Agreement with transformers' BLOOM is in tests/interop/test_bloom_transformers.py.
"""
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank.errors import ConfigError
from lowrank.models.bloom import BloomConfig, BloomForCausalLM, alibi_slopes, bloom_gelu

from .helpers import assert_close_rel as assert_close

VOCAB = 50
TINY = dict(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.3)  # 6: not a power of two


def tiny_model(seed=0, **overrides) -> BloomForCausalLM:
    """A random BLOOM with random biases and LayerNorms too (its init makes them 0 and the identity)."""
    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.1)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def paper_slopes(n: int) -> np.ndarray:
    """ALiBi's slopes in float64, from the paper (Press et al. 2022, sec. 3 and its reference code): for n a
    power of two the geometric sequence starting at 2^(-8/n) with that ratio; otherwise those of the closest
    lower power of two, then every other slope of twice that many heads."""
    if math.log2(n).is_integer():
        start = 2.0 ** (-8.0 / n)
        return start ** np.arange(1, n + 1, dtype=np.float64)
    m = 2 ** math.floor(math.log2(n))
    return np.concatenate([paper_slopes(m), paper_slopes(2 * m)[0::2][: n - m]])


@pytest.mark.parametrize("n_head", range(1, 17))
def test_alibi_slopes_are_the_papers(n_head):
    slopes = alibi_slopes(n_head)
    assert slopes.dtype == torch.float32 and slopes.shape == (n_head,)
    assert_close(slopes, torch.from_numpy(paper_slopes(n_head)), rtol=1e-6, scale=0)  # float32 powers, as transformers computes them


def test_bloom_gelu_is_transformers_tanh_formula():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    expected = x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))  # bloom_gelu_forward
    assert_close(bloom_gelu(x), expected, rtol=1e-8)


def test_parameter_names_are_transformers_state_dict_names(model):
    expected = {"transformer.word_embeddings.weight", "lm_head.weight"}
    for norm in ("transformer.word_embeddings_layernorm", "transformer.ln_f"):
        expected |= {f"{norm}.weight", f"{norm}.bias"}
    for i in range(2):
        for name in ("input_layernorm", "self_attention.query_key_value", "self_attention.dense",
                     "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            expected |= {f"transformer.h.{i}.{name}.weight", f"transformer.h.{i}.{name}.bias"}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["transformer.h.0.self_attention.query_key_value.weight"].shape == (144, 48)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert "lm_head.weight" not in model.checkpoint_state_dict()


def test_a_checkpoint_without_the_transformer_prefix_normalizes_to_the_same_state(model):
    state = model.checkpoint_state_dict()
    hub = {k.removeprefix("transformer."): t for k, t in state.items()}  # bigscience's layout
    assert "h.0.self_attention.query_key_value.weight" in hub
    normalized = BloomForCausalLM.normalize_checkpoint(hub, model.config)
    assert normalized.keys() == model.state_dict().keys()
    assert normalized["lm_head.weight"] is hub["word_embeddings.weight"]
    with pytest.raises(ValueError, match="with and without"):
        BloomForCausalLM.normalize_checkpoint({**hub, **state}, model.config)


def test_init_is_transformers_default(model):
    fresh = BloomForCausalLM(BloomConfig(**{**TINY, "hidden_size": 96, "vocab_size": 500}))
    assert abs(fresh.transformer.word_embeddings.weight.std().item() - 0.3) < 0.01
    for name, p in fresh.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif "layernorm" in name or "ln_f" in name:
            assert torch.equal(p, torch.ones_like(p)), name


def test_config_round_trips_and_reads_transformers_older_names():
    d = {**TINY, "offset_alibi": 100, "model_type": "bloom"}
    config = BloomConfig.from_dict(d)
    assert config.extra == {"offset_alibi": 100}
    out = config.to_dict()
    assert out["model_type"] == "bloom" and out["architectures"] == ["BloomForCausalLM"]
    assert {k: out[k] for k in d} == d and BloomConfig.from_dict(out) == config
    old = BloomConfig.from_dict({"n_embed": 64, "hidden_size": 32, "num_attention_heads": 4, "n_head": 8,
                                 "num_hidden_layers": 3})
    assert (old.hidden_size, old.n_head, old.n_layer, old.extra) == (64, 4, 3, {})  # the old name wins
    assert (old.num_attention_heads, old.num_hidden_layers) == (4, 3)
    assert BloomConfig(pretraining_tp=4).pretraining_tp == 4  # without slow_but_exact it changes nothing


@pytest.mark.parametrize("bad, field", [
    (dict(hidden_size=50), "hidden_size=50 is not divisible by n_head=6"),
    (dict(pretraining_tp=2, slow_but_exact=True), "slow_but_exact=True with pretraining_tp=2"),
    (dict(n_layer=0), "n_layer=0 must be >= 1"), (dict(n_head=-2), "n_head=-2"),
    (dict(pretraining_tp=0), "pretraining_tp=0"), (dict(hidden_size="48"), "hidden_size='48' must be an integer"),
    (dict(hidden_dropout=1.0), "hidden_dropout=1.0"), (dict(attention_dropout=-0.1), "attention_dropout=-0.1"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon=0.0 must be > 0"),
    (dict(apply_residual_connection_post_layernorm="yes"), "apply_residual_connection_post_layernorm='yes'"),
])
def test_config_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        BloomConfig(**{**TINY, **bad})


def test_position_ids_are_refused(model):
    with pytest.raises(ValueError, match="takes no position_ids"):
        model(torch.tensor([[1, 2]]), position_ids=torch.tensor([[0, 1]]))


@given(length=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_masked_keys_are_as_if_absent(model, length, seed):
    """ALiBi counts a key's position over the real keys of its row, so a mask with holes anywhere gives the
    real tokens the logits of the row with the masked tokens removed."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, length), generator=gen)
    mask = (torch.rand(1, length, generator=gen) < 0.6).long()
    mask[0, -1] = 1
    note(f"mask={mask.tolist()}")
    real = mask[0].bool()
    assert_close(model(ids, attention_mask=mask).logits[0, real], model(ids[:, real]).logits[0])


def test_dropout_is_active_in_train_mode_only():
    model = tiny_model(hidden_dropout=0.5, attention_dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    assert_close(tiny_model().train()(ids).logits, tiny_model()(ids).logits)


def test_decoding_grows_the_cache_without_a_length_limit(model):
    assert model.max_positions is None
    ids = torch.randint(0, VOCAB, (1, 33 + 35))
    cache, _ = model.prefill(ids[:, :33])  # room for 66 tokens: decoding past them grows the buffers
    for t in range(33, ids.size(1) - 1):
        model.decode_step(cache, ids[:, t])
    assert_close(model.decode_step(cache, ids[:, -1]), model(ids).logits[:, -1])
