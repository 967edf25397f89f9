"""Our Llama, Qwen2 and Mistral against transformers': checkpoints written by one load in the other, and logits,
loss and greedy tokens agree, across the config fields that change the math (grouped-query attention, biases,
tied heads, RoPE scalings, explicit head_dim, sliding windows)."""
import json

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank import models

from ..helpers import assert_close_rel, greedy_by_forward, left_padded, returned_cache

transformers = pytest.importorskip("transformers")

VOCAB = 96
# A wide init keeps greedy choices away from ties; no eos, so generation runs its full length.
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            initializer_range=0.3, max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)  # head_dim 16: high, medium and low frequencies all occur
VARIANTS = {
    "llama_gqa_untied": ("Llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama3_rope_tied": ("Llama", dict(hidden_size=64, tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "qwen2_qkv_bias": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                                     sliding_window=5, max_window_layers=1)),  # layer 1 only slides
    "mistral_window": ("Mistral", dict(num_key_value_heads=2, sliding_window=4)),
}


def transformers_model(family: str, seed=0, **overrides):
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**{**BASE, **overrides})
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, ours loaded from its save_pretrained folder, the folder)."""
    family, overrides = VARIANTS[request.param]
    hf = transformers_model(family, **overrides)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, models.from_pretrained(folder), folder



def real_positions(mask):
    """Position ids as transformers' generate computes them: real tokens counted, padding at 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def transformers_cached_greedy(hf, ids, mask, steps: int):
    """Greedy tokens from transformers' forward with its KV cache, one new token per step (as its generate)."""
    positions, out = real_positions(mask), []
    logits, cache = None, None
    for _ in range(steps):
        step = ids if cache is None else out[-1]
        result = hf(step, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache = returned_cache(result)
        out.append(result.logits[:, -1].argmax(-1, keepdim=True))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat([ids, *out], dim=1)


def assert_logits_equal_on_real_tokens(ours, hf, ids, mask):
    positions, real = real_positions(mask), mask.bool()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        assert_close_rel(ours(ids, attention_mask=mask, position_ids=positions).logits[real], expected[real])


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_logits_equal_transformers_with_and_without_padding(pair, lengths, seed):
    hf, ours, _ = pair
    ids, mask = left_padded(lengths, torch.Generator().manual_seed(seed), VOCAB)
    note(f"mask={mask.tolist()}")
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, hf(ids).logits)
    assert_logits_equal_on_real_tokens(ours, hf, ids, mask)


def test_loss_equals_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (3, 10))
    labels = ids.masked_fill(torch.rand(3, 10) < 0.3, -100)
    with torch.no_grad():
        assert_close_rel(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss)


def test_greedy_generation_equals_a_greedy_loop_over_transformers_forward(pair):
    """12 new tokens: Mistral's and Qwen2's windows (4, 5) are passed well before the end."""
    hf, ours, _ = pair
    ids, mask = left_padded([7, 3, 5], torch.Generator().manual_seed(1), VOCAB)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=12), greedy_by_forward(hf, ids, mask, 12))
    row = ids[1:2, -3:]
    assert torch.equal(ours.generate(row, max_new_tokens=12), greedy_by_forward(hf, row, torch.ones_like(row), 12))


def test_our_save_pretrained_loads_in_transformers(pair, tmp_path):
    hf, ours, folder = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(hf)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, hf(ids).logits)
    ours_json, theirs = (json.loads((f / "config.json").read_text()) for f in (tmp_path, folder))
    assert {k: ours_json.get(k) for k in theirs} == theirs  # what transformers wrote, rope_parameters included
    assert set(ours_json) - set(theirs) <= {"head_dim"}  # Qwen2Config has no head_dim field; it reads one


@pytest.mark.parametrize("rope", ["linear_old_format", "dynamic"])
@pytest.mark.parametrize("lengths", [[5, 3], [16, 9], [17, 12], [30, 21]])
def test_rope_scaling_logits_equal_transformers(rope, lengths, tmp_path):
    """max_position_embeddings=16: dynamic scaling starts past 16 tokens. The linear model's config.json is in
    the form transformers 4 wrote (rope_scaling with "type", rope_theta outside); both libraries read it."""
    if rope == "dynamic":
        hf = transformers_model("Llama", max_position_embeddings=16,
                                rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
        hf.save_pretrained(tmp_path)
    else:
        hf = transformers_model("Llama", max_position_embeddings=16)
        hf.save_pretrained(tmp_path)
        raw = json.loads((tmp_path / "config.json").read_text())
        del raw["rope_parameters"]
        raw.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
        (tmp_path / "config.json").write_text(json.dumps(raw))
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert hf.config.rope_parameters["rope_theta"] == 500000.0
    ours = models.from_pretrained(tmp_path)
    assert ours.config.rope_parameters == hf.config.rope_parameters
    ids, mask = left_padded(lengths, torch.Generator().manual_seed(len(lengths)), VOCAB)
    assert_logits_equal_on_real_tokens(ours, hf, ids, mask)  # a fresh transformers model: see models/rope.py


def test_dynamic_rope_kv_cache_generation_equals_transformers_cached_loop(tmp_path):
    """Past max_position_embeddings each step's new key is rotated at the then current length, in both
    libraries' caches (models/rope.py: full recomputation would re-rotate the old keys)."""
    hf = transformers_model("Llama", max_position_embeddings=16, num_key_value_heads=2,
                            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0))
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path)
    ids, mask = left_padded([12, 9], torch.Generator().manual_seed(2), VOCAB)
    expected = transformers_cached_greedy(hf, ids, mask, 14)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=14), expected)
    assert not torch.equal(greedy_by_forward(hf, ids, mask, 14), expected)  # the difference the cache makes


def test_explicit_head_dim_unequal_to_hidden_over_heads(tmp_path):
    hf = transformers_model("Llama", head_dim=16, num_key_value_heads=2)  # hidden 32 / 4 heads would be 8
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path)
    assert ours.model.layers[0].self_attn.q_proj.out_features == 64
    ids, mask = left_padded([6, 4], torch.Generator().manual_seed(3), VOCAB)
    assert_logits_equal_on_real_tokens(ours, hf, ids, mask)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=6), greedy_by_forward(hf, ids, mask, 6))


def test_sharded_bfloat16_checkpoint_loads_close_to_transformers_bfloat16(tmp_path):
    transformers_model("Llama", num_key_value_heads=2).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = models.from_pretrained(tmp_path, dtype="bfloat16")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        logits = ours(ids).logits
        assert logits.dtype == torch.bfloat16
        assert_close_rel(logits, hf(ids).logits, dtype=torch.bfloat16)


def test_eos_token_id_list_is_read_written_and_stops_generation(tmp_path):
    hf = transformers_model("Llama")
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    tokens = greedy_by_forward(hf, prompt, torch.ones_like(prompt), 8)[0, 5:].tolist()
    stop = tokens[3] if tokens[3] not in tokens[:3] else tokens[0]  # the first step that emits it
    never = next(i for i in range(VOCAB) if i not in tokens)
    hf.config.eos_token_id = [never, stop]
    hf.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path)
    assert ours.config.eos_token_id == [never, stop]
    generated = ours.generate(prompt, max_new_tokens=8)[0, 5:].tolist()
    assert generated == tokens[: tokens.index(stop) + 1]
    ours.save_pretrained(tmp_path / "ours")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "ours").eos_token_id == [never, stop]
