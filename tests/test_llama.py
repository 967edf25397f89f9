"""The Llama family (models/llama.py, models/rope.py) on its own: RoPE against a float64 NumPy reference of
the formulas, the sliding window's reach, grouped-query attention against the same model with its key/value
heads repeated, and config checks. KV cache and padding: tests/test_decoder_cache.py, over every decoder."""
import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank import models
from lowrank.errors import ConfigError
from lowrank.models.rope import RotaryEmbedding, apply_rotary, inverse_frequencies

from .helpers import assert_close_rel, left_padded

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=64, eos_token_id=None)
FAMILIES = {  # name: (config class, model class, overrides)
    "llama_biases": (models.LlamaConfig, models.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "llama_dynamic": (models.LlamaConfig, models.LlamaForCausalLM,
                      dict(rope_parameters=dict(rope_type="dynamic", rope_theta=100.0, factor=2.0))),
    "qwen2_mixed_windows": (models.Qwen2Config, models.Qwen2ForCausalLM,
                            dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "mistral_window": (models.MistralConfig, models.MistralForCausalLM, dict(sliding_window=3)),
}


def tiny(name, seed=0, **overrides):
    config_class, model_class, family = FAMILIES[name]
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY, **family, **overrides})).eval()


# RoPE against the formulas, in float64.

def reference_inverse_frequencies(params, dim, max_positions, seq_len):
    """The frequencies of models/rope.py's table, written from the formulas, in float64."""
    theta, kind = params["rope_theta"], params["rope_type"]
    if kind == "dynamic" and seq_len > max_positions:
        factor = params["factor"]
        theta *= (factor * seq_len / max_positions - (factor - 1)) ** (dim / (dim - 2))
    freq = theta ** -(np.arange(0, dim, 2) / dim)
    if kind == "linear":
        freq = freq / params["factor"]
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        context = params["original_max_position_embeddings"]
        wavelength = 2 * np.pi / freq
        smooth = (context / wavelength - low) / (high - low)  # 0 at wavelength context / low, 1 at context / high
        mixed = (1 - smooth) * freq / factor + smooth * freq
        freq = np.where(wavelength < context / high, freq, np.where(wavelength > context / low, freq / factor, mixed))
    return freq


thetas, factors = st.floats(10.0, 1e6), st.floats(1.0, 8.0)
rope_parameters = st.one_of(
    st.builds(lambda t: dict(rope_type="default", rope_theta=t), thetas),
    st.builds(lambda t, f: dict(rope_type="linear", rope_theta=t, factor=f), thetas, factors),
    st.builds(lambda t, f: dict(rope_type="dynamic", rope_theta=t, factor=f), thetas, factors),
    st.builds(lambda t, f, low, gap, c: dict(rope_type="llama3", rope_theta=t, factor=f, low_freq_factor=low,
                                             high_freq_factor=low + gap, original_max_position_embeddings=c),
              thetas, factors, st.floats(0.5, 2.0), st.floats(0.5, 4.0), st.integers(8, 512)),
)


@given(params=rope_parameters, half_dim=st.integers(2, 32), seq_len=st.integers(1, 200))
def test_inverse_frequencies_equal_the_formulas(params, half_dim, seq_len):
    note(f"params={params}")
    actual = inverse_frequencies(params, 2 * half_dim, 64, seq_len)
    expected = torch.from_numpy(reference_inverse_frequencies(params, 2 * half_dim, 64, seq_len))
    assert actual.dtype == torch.float32
    assert_close_rel(actual, expected, scale=0)  # elementwise relative: the frequencies span decades


@given(params=rope_parameters, half_dim=st.integers(2, 16), seed=st.integers(0, 2**16))
def test_rotary_embedding_rotates_channel_pairs_by_position_times_frequency(params, half_dim, seed):
    dim, g = 2 * half_dim, torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, dim, generator=g)
    positions = torch.randint(0, 64, (2, 5), generator=g)
    seq_len = int(positions.max()) + 1
    actual = apply_rotary(x, *RotaryEmbedding(params, dim, 16)(positions, torch.float32))
    angle = positions.double().numpy()[:, None, :, None] * reference_inverse_frequencies(params, dim, 16, seq_len)
    x1, x2 = x.double().numpy()[..., :half_dim], x.double().numpy()[..., half_dim:]
    expected = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
    assert_close_rel(actual, torch.from_numpy(expected))


@given(params=rope_parameters.filter(lambda p: p["rope_type"] != "dynamic"), m=st.integers(0, 50),
       n=st.integers(0, 50), shift=st.integers(0, 50), seed=st.integers(0, 2**16))
def test_rotated_scores_depend_on_the_relative_position_only(params, m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    rope = RotaryEmbedding(params, 16, 64)

    def score(i, j):
        return (apply_rotary(q, *rope(torch.tensor([[i]]), torch.float32))
                * apply_rotary(k, *rope(torch.tensor([[j]]), torch.float32))).sum()

    assert_close_rel(score(m + shift, n + shift), score(m, n), scale=float(q.norm() * k.norm()))


# The model: caching, padding, grouped-query attention.

@given(window=st.integers(1, 4), pad=st.integers(0, 3), seed=st.integers(0, 99))
def test_a_sliding_window_of_w_gives_two_layers_a_receptive_field_of_2w_minus_1_tokens(window, pad, seed):
    """A key in slot j reaches the query in slot i through one layer iff i - w < j <= i, so through two layers
    iff i - 2(w - 1) <= j; left padding shifts the slots, not the field."""
    model = tiny("mistral_window", sliding_window=window)
    ids, mask = left_padded([12, 12 - pad], torch.Generator().manual_seed(seed), VOCAB)
    reach = 2 * (window - 1)
    with torch.no_grad():
        last = model(ids, attention_mask=mask).logits[:, -1]
        for j, reached in ((11 - reach, True), (10 - reach, False)):
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 1) % VOCAB
            moved = (model(changed, attention_mask=mask).logits[:, -1] - last).abs().amax(-1) > 1e-4
            assert moved[0] == reached and (moved[1] == reached or j < pad)


def repeated_key_value_heads(state: dict, groups: int, head_dim: int) -> dict:
    """k_proj / v_proj weights and biases with each key/value head repeated `groups` times, as the query heads
    that share it see it."""
    def repeat(t):
        return t.unflatten(0, (-1, head_dim)).repeat_interleave(groups, dim=0).flatten(0, 1)

    return {k: repeat(t) if ".k_proj." in k or ".v_proj." in k else t for k, t in state.items()}


@pytest.mark.parametrize("name", ["llama_biases", "mistral_window"])
def test_grouped_query_attention_equals_attention_with_repeated_key_value_heads(name):
    grouped = tiny(name)
    full = tiny(name, num_key_value_heads=4)
    full.load_state_dict(repeated_key_value_heads(grouped.state_dict(), 2, grouped.config.head_dim))
    ids, mask = left_padded([6, 4], torch.Generator().manual_seed(5), VOCAB)
    with torch.no_grad():
        assert_close_rel(grouped(ids, attention_mask=mask).logits, full(ids, attention_mask=mask).logits)
    assert torch.equal(grouped.generate(ids, mask, max_new_tokens=6), full.generate(ids, mask, max_new_tokens=6))


def test_the_cache_and_a_prefix_hold_the_key_value_heads():
    model = tiny("llama_biases")
    assert model.prefix_attention() == (2, 2, 8)
    cache, _ = model.prefill(torch.randint(0, VOCAB, (1, 3)))
    assert cache.k.shape[:3] == (2, 1, 2)
    prefix = [(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)) for _ in range(2)]
    ids, mask = torch.randint(0, VOCAB, (1, 5)), torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad():
        forward = model(ids, attention_mask=mask, past_key_values=prefix)  # positions 4..8, after the prefix
        _, last = model.prefill(ids, mask, past_key_values=prefix)
    assert_close_rel(last, forward.logits[:, -1])


# Configs.

def test_configs_round_trip_and_read_the_older_rope_keys():
    for config_class, _, family in FAMILIES.values():
        config = config_class(**{**TINY, **family})
        assert config_class.from_dict(config.to_dict()) == config
    legacy = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}  # transformers 4's keys
    old = models.LlamaConfig.from_dict({**TINY, **legacy})
    assert old.rope_parameters == {"type": "linear", "factor": 4.0, "rope_theta": 500000.0, "rope_type": "linear"}
    assert "rope_scaling" not in old.to_dict() and "rope_theta" not in old.to_dict()
    assert models.LlamaConfig(**TINY).rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert models.LlamaConfig(**{**TINY, "eos_token_id": [3, 7]}).to_dict()["eos_token_id"] == [3, 7]
    assert models.Qwen2Config(**TINY).sliding_window is None  # as transformers: only with use_sliding_window
    assert models.Qwen2Config(**{**FAMILIES["qwen2_mixed_windows"][2], **TINY}).layer_windows() == [None, 3]


LLAMA3 = dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize("config_class, overrides, field", [
    (models.LlamaConfig, dict(num_key_value_heads=3), "num_key_value_heads"),
    (models.LlamaConfig, dict(head_dim=7), "head_dim"),
    (models.LlamaConfig, dict(num_attention_heads=0), "num_attention_heads"),
    (models.LlamaConfig, dict(hidden_act="swiglu"), "hidden_act"),
    (models.LlamaConfig, dict(pad_token_id=VOCAB), "pad_token_id"),
    (models.LlamaConfig, dict(eos_token_id=[1, "2"]), "eos_token_id"),
    (models.LlamaConfig, dict(eos_token_id=[]), "eos_token_id"),
    (models.LlamaConfig, dict(eos_token_id=True), "eos_token_id"),
    (models.LlamaConfig, dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (models.LlamaConfig, dict(attention_dropout=1.0), "attention_dropout"),
    (models.LlamaConfig, dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "rope_type"),
    (models.LlamaConfig, dict(rope_parameters=dict(rope_type="linear")), "factor"),
    (models.LlamaConfig, dict(rope_parameters=dict(rope_type="dynamic", factor="2")), "factor"),
    (models.LlamaConfig, dict(rope_parameters=dict(rope_type="default", rope_theta=-1.0)), "rope_theta"),
    (models.LlamaConfig, dict(rope_parameters={**LLAMA3, "high_freq_factor": 1.0}), "high_freq_factor"),
    (models.LlamaConfig, dict(rope_parameters={**LLAMA3, "low_freq_factor": None}), "low_freq_factor"),
    (models.LlamaConfig, dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=0.5)),
     "partial_rotary_factor"),
    (models.LlamaConfig, dict(rope_parameters="linear"), "rope_parameters"),
    (models.LlamaConfig, dict(extra=dict(rope_scaling=2.0)), "rope_scaling"),
    (models.MistralConfig, dict(sliding_window=0), "sliding_window"),
    (models.Qwen2Config, dict(layer_types=["full_attention"]), "layer_types"),
    (models.Qwen2Config, dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    (models.Qwen2Config, dict(layer_types=["sliding_attention"] * 2), "sliding_window"),
    (models.Qwen2Config, dict(max_window_layers=-1), "max_window_layers"),
])
def test_config_errors_name_the_field(config_class, overrides, field):
    with pytest.raises(ConfigError, match=field):
        config_class(**{**TINY, **overrides})


def test_a_bad_config_json_names_the_file_and_field(tmp_path):
    model = tiny("mistral_window")
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"num_key_value_heads": 2', '"num_key_value_heads": 3')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ConfigError, match=r"config\.json.*num_key_value_heads=3"):
        models.from_pretrained(tmp_path)


def test_rope_needs_no_buffer_and_has_no_length_limit():
    model = tiny("llama_biases")
    assert not list(model.buffers()) and model.max_positions is None
    ids = torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        far, near = model(ids, position_ids=torch.tensor([[10_000, 10_001, 10_002]])).logits, model(ids).logits
    assert far.isfinite().all() and not torch.allclose(far, near)
