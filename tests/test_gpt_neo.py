"""Properties of models.gpt_neo on its own: layout, config, the local window, checkpoints.

KV cache and padding: tests/test_decoder_cache.py, over every decoder.
Agreement with transformers' GPT-Neo is in tests/interop/test_gpt_neo_transformers.py.
"""
import re

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowrank import models
from lowrank.errors import ConfigError
from lowrank.models.gpt_neo import GPTNeoConfig, GPTNeoForCausalLM

from .helpers import assert_close_rel as assert_close

WINDOW = 4
TINY = dict(vocab_size=50, max_position_embeddings=48, hidden_size=32, num_layers=4, num_heads=4,
            attention_types=[[["global", "local"], 2]], window_size=WINDOW, initializer_range=0.3)


def tiny_model(seed=0, **overrides) -> GPTNeoForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoForCausalLM(GPTNeoConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_parameter_names_are_transformers_state_dict_names(model):
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    for i in range(4):
        expected |= {f"transformer.h.{i}.attn.attention.{p}_proj.weight" for p in "kvq"}
        expected |= {f"transformer.h.{i}.attn.attention.out_proj.{p}" for p in ("weight", "bias")}
        expected |= {f"transformer.h.{i}.{m}.{p}" for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
                     for p in ("weight", "bias")}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)  # nn.Linear: (out, in)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert [block.attn.attention_type for block in model.transformer.h] == ["global", "local"] * 2
    assert model.prefix_attention() == (4, 4, 8)


def test_defaults_are_transformers_and_the_generic_names_alias_the_fields():
    config = GPTNeoConfig()
    assert config.attention_layers == ["global", "local"] * 12
    assert (config.num_hidden_layers, config.num_attention_heads) == (24, 16) == (config.num_layers, config.num_heads)
    assert (config.window_size, config.max_position_embeddings, config.hidden_size) == (256, 2048, 2048)


@given(items=st.lists(st.tuples(st.lists(st.sampled_from(["global", "local"]), min_size=1, max_size=3),
                                st.integers(0, 3)), min_size=1, max_size=3))
def test_attention_types_expand_to_one_type_per_layer_as_transformers(items):
    attention_types = [[kinds, repeats] for kinds, repeats in items]
    expected = sum((kinds * repeats for kinds, repeats in items), [])
    note(f"expected={expected}")
    if not expected:
        with pytest.raises(ConfigError, match="num_layers"):
            GPTNeoConfig(**{**TINY, "num_layers": 1, "attention_types": attention_types})
        return
    config = GPTNeoConfig(**{**TINY, "num_layers": len(expected), "attention_types": attention_types})
    assert config.attention_layers == expected
    written = config.to_dict()
    assert written["attention_layers"] == expected and written["model_type"] == "gpt_neo"
    assert GPTNeoConfig.from_dict(written) == config and "attention_layers" not in config.extra


def test_config_round_trips_unknown_keys():
    d = {**TINY, "use_cache": True, "summary_type": "cls_index", "model_type": "gpt_neo"}
    config = GPTNeoConfig.from_dict(d)
    assert config.extra == {"use_cache": True, "summary_type": "cls_index"}
    out = config.to_dict()
    assert {k: out[k] for k in d} == d and out["architectures"] == ["GPTNeoForCausalLM"]


def test_a_written_attention_layers_must_be_what_attention_types_expands_to():
    written = {**GPTNeoConfig(**TINY).to_dict(), "attention_layers": ["local"] * 4}
    with pytest.raises(ConfigError, match=r"config.json: attention_layers=\['local'.*expands to"):
        GPTNeoConfig.from_dict(written, source="config.json")


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_size=30), "hidden_size=30 is not divisible by num_heads=4"),
    (dict(activation_function="gelu_x"), "activation_function='gelu_x'"),
    (dict(attention_types=[[["global", "sliding"], 2]]), "attention_types holds 'sliding'"),
    (dict(attention_types=[["global", 4]]), "attention_types=[['global', 4]]: expected a list of [[types...], "),
    (dict(attention_types=[[["global"], -1]]), "attention_types=[[['global'], -1]]"),
    (dict(attention_types=[[["global"], 3]]), "gives 3 layers (attention_layers), num_layers=4"),
    (dict(attention_types="global"), "attention_types='global' must be a list or null"),
    (dict(window_size=0), "window_size=0 must be >= 1"),
    (dict(num_heads=0), "num_heads=0 must be >= 1"),
    (dict(intermediate_size=0), "intermediate_size=0"),
    (dict(attention_dropout=1.0), "attention_dropout=1.0 must be in [0, 1)"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon=0.0 must be > 0"),
    (dict(num_layers=4.0), "num_layers=4.0 must be an integer"),
])
def test_config_rejects_bad_values_naming_the_field(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GPTNeoConfig(**{**TINY, **bad})


def test_attention_is_the_unscaled_softmax_of_query_key_products():
    attention = tiny_model().transformer.h[0].attn.attention.double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    q, k, v = (proj(x).view(2, 6, 4, 8).transpose(1, 2)
               for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    scores = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = attention.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    assert_close(attention(x, None, True, None), expected, dtype=torch.float64)


@pytest.mark.parametrize("local_layers, changed", [(True, range(WINDOW)), (False, range(12))])
def test_a_local_layer_sees_only_the_last_window_size_slots(local_layers, changed):
    one_layer = tiny_model(num_layers=1, attention_types=[[["local" if local_layers else "global"], 1]])
    ids = torch.randint(0, 50, (1, 12))
    edited = ids.clone()
    edited[0, 0] = (ids[0, 0] + 1) % 50
    moved = (one_layer(ids).logits - one_layer(edited).logits).abs().amax(-1)[0] > 0
    assert moved.tolist() == [i in changed for i in range(12)]


def test_init_is_transformers_generic_one_without_residual_rescaling(model):
    block = model.transformer.h[1]
    for linear in (block.attn.attention.q_proj, block.attn.attention.out_proj, block.mlp.c_proj):
        assert abs(linear.weight.std().item() - 0.3) < 0.03
    assert not block.attn.attention.out_proj.bias.any() and not block.mlp.c_fc.bias.any()
    assert torch.equal(block.ln_1.weight, torch.ones(32)) and not block.ln_1.bias.any()


def test_token_type_ids_add_the_token_embedding(model):
    ids, types = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))
    wte = model.transformer.wte
    assert_close(model(ids, token_type_ids=types).logits, model(inputs_embeds=wte(ids) + wte(types)).logits)


def test_input_longer_than_max_position_embeddings_raises_naming_the_field(model):
    with pytest.raises(ValueError, match=r"49 tokens.*max_position_embeddings=48"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_checkpoint_with_old_mask_buffers_loads(model, tmp_path):
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    causal = torch.ones(1, 1, 48, 48, dtype=torch.bool).tril()
    for i, kind in enumerate(model.config.attention_layers):
        bias = causal ^ causal.tril(-WINDOW) if kind == "local" else causal
        tensors[f"transformer.h.{i}.attn.attention.bias"] = bias.clone()  # safetensors refuses shared storage
        tensors[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = models.from_pretrained(tmp_path)
    assert isinstance(loaded, GPTNeoForCausalLM)
    ids = torch.randint(0, 50, (2, 10))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
