"""What every decoder promises about caching and padding, one test each over every decoder: GPT-2, GPT-Neo
(a local window of 4), BLOOM (ALiBi over 6 heads), Llama (biases; dynamic RoPE), Qwen2 (mixed windows)
and Mistral (a window of 3).

- KV-cache decoding (forward's past_key_values, and prefill/decode_step) equals recomputing the whole
  sequence, left padding included and past every window;
- a left-padded batch equals each row run alone: forward, decoding and generate;
- a learned prefix (prefix tuning's past_key_values) before a padded batch equals each row alone after it.

Positions of padded rows count real tokens from 0 (as transformers' generation sets them); BLOOM takes
none, its ALiBi reads key positions from the mask.
"""
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank import models

from .helpers import assert_close_rel, left_padded

VOCAB = 50
WIDE = dict(initializer_range=0.3)  # a wide init: distinct logits, greedy choices away from ties
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, **WIDE)
DECODERS = {  # name: (model class, config class, config)
    "gpt2": (models.GPT2LMHeadModel, models.GPT2Config,
             dict(vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, eos_token_id=None, **WIDE)),
    "gpt_neo_window": (models.GPTNeoForCausalLM, models.GPTNeoConfig,
                       dict(vocab_size=VOCAB, max_position_embeddings=48, hidden_size=32, num_layers=4, num_heads=4,
                            attention_types=[[["global", "local"], 2]], window_size=4, eos_token_id=None, **WIDE)),
    "bloom": (models.BloomForCausalLM, models.BloomConfig,
              dict(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, eos_token_id=None, **WIDE)),
    "llama_biases": (models.LlamaForCausalLM, models.LlamaConfig, dict(LLAMA, attention_bias=True, mlp_bias=True)),
    "llama_dynamic_rope": (models.LlamaForCausalLM, models.LlamaConfig,
                           dict(LLAMA, rope_parameters=dict(rope_type="dynamic", rope_theta=100.0, factor=2.0))),
    "qwen2_mixed_windows": (models.Qwen2ForCausalLM, models.Qwen2Config,
                            dict(LLAMA, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "mistral_window": (models.MistralForCausalLM, models.MistralConfig, dict(LLAMA, sliding_window=3)),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def model(request):
    """A random decoder in eval mode, with random biases and norms too (inits make them 0 and 1)."""
    model_class, config_class, config = DECODERS[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.1)
    return model


def positions(model, mask) -> dict:
    """position_ids (B, T) counting each row's real tokens from 0, for the models that take them."""
    return dict(position_ids=(mask.cumsum(-1) - 1).clamp(min=0)) if model.uses_position_ids else {}


def windowed(config) -> bool:
    """Whether some layer attends within a window: GPT-Neo's local layers, Mistral's and Qwen2's sliding one."""
    return "local" in getattr(config, "attention_layers", ()) or getattr(config, "sliding_window", None) is not None \
        and getattr(config, "use_sliding_window", True)


def batch_and_continuations(lengths, steps, seed):
    """Left-padded prompts (ids, mask) (B, max(lengths)) and `steps` more tokens per row (B, steps)."""
    generator = torch.Generator().manual_seed(seed)
    ids, mask = left_padded(lengths, generator, VOCAB)
    return ids * mask, mask, torch.randint(0, VOCAB, (len(lengths), steps), generator=generator)


def decoded(model, cache, last, new) -> torch.Tensor:
    """prefill's last logits, then decode_step's on new (B, S)[:, :-1]: (B, S, V), the logits of each new token."""
    return torch.stack([last] + [model.decode_step(cache, new[:, t]) for t in range(new.shape[1] - 1)], dim=1)


@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3), steps=st.integers(1, 9), padded=st.booleans(),
       seed=st.integers(0, 2**16))
@torch.no_grad()
def test_kv_cache_decoding_equals_full_recomputation(model, lengths, steps, padded, seed):
    """Steps pass the windows (3 and 4). Within max_position_embeddings, as dynamic RoPE's cache keeps each
    key's rotation at the length it was computed at (as transformers' does): tests/interop covers past it."""
    if not padded:
        lengths = [max(lengths)] * len(lengths)
    ids, mask, new = batch_and_continuations(lengths, steps, seed)
    note(f"mask={mask.tolist()}")
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    width = ids.shape[1]
    expected = torch.stack([model(full_ids[:, :t], attention_mask=full_mask[:, :t],
                                  **positions(model, full_mask[:, :t])).logits[:, -1]
                            for t in range(width, width + steps)], dim=1)

    cache, last = model.prefill(ids, mask)
    assert_close_rel(decoded(model, cache, last, new), expected)

    every = positions(model, full_mask)
    out = model(ids, attention_mask=mask, use_cache=True, **{k: p[:, :width] for k, p in every.items()})
    stepped = [out.logits[:, -1]]
    layers, heads, head_dim = model.prefix_attention()
    assert len(out.past_key_values) == layers and out.past_key_values[0][0].shape == (len(lengths), heads, width,
                                                                                      head_dim)
    for t in range(width, width + steps - 1):
        out = model(full_ids[:, t:t + 1], attention_mask=full_mask[:, :t + 1], past_key_values=out.past_key_values,
                    use_cache=True, **{k: p[:, t:t + 1] for k, p in every.items()})
        stepped.append(out.logits[:, -1])
    assert_close_rel(torch.stack(stepped, 1), expected)


@given(lengths=st.lists(st.integers(1, 8), min_size=2, max_size=4), steps=st.integers(1, 6), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_a_left_padded_batch_equals_each_row_run_alone(model, lengths, steps, seed):
    ids, mask, new = batch_and_continuations(lengths, steps, seed)
    note(f"mask={mask.tolist()}")
    forward = model(ids, attention_mask=mask, **positions(model, mask)).logits
    batched = decoded(model, *model.prefill(ids, mask), new)
    generated = model.generate(ids, mask, max_new_tokens=steps)
    for i, n in enumerate(lengths):
        alone = torch.cat([ids[i:i + 1, -n:], new[i:i + 1]], 1)
        logits = model(alone[:, :-1]).logits[0]
        assert_close_rel(forward[i, -n:], logits[:n])
        assert_close_rel(batched[i], logits[n - 1:])
        assert torch.equal(generated[i, -steps:], model.generate(alone[:, :n], max_new_tokens=steps)[0, -steps:])


@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3), n_prefix=st.integers(1, 4),
       steps=st.integers(1, 4), embeddings=st.booleans(), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_a_prefix_before_a_padded_batch_equals_each_row_alone_after_it(model, lengths, n_prefix, steps, embeddings,
                                                                       seed):
    """The prefix holds the first n_prefix positions, the padding after it shifts nothing; inputs_embeds
    stand for input_ids. Except through a window: windows count cache slots, as transformers' do, so padding
    between the prefix and the text moves the prefix further out (peft's prefix tuning on GPT-Neo's local
    layers agrees, tests/interop/test_prompts_peft.py); windowed models get rows of one length here."""
    if windowed(model.config):
        lengths = [max(lengths)] * len(lengths)
    layers, heads, head_dim = model.prefix_attention()
    generator = torch.Generator().manual_seed(seed)
    prefix = [tuple(torch.randn(1, heads, n_prefix, head_dim, generator=generator) for _ in "kv")
              for _ in range(layers)]
    ids, mask, new = batch_and_continuations(lengths, steps, seed + 1)
    batch = len(lengths)
    batch_prefix = [tuple(t.expand(batch, -1, -1, -1) for t in layer) for layer in prefix]
    inputs = dict(inputs_embeds=model.get_input_embeddings()(ids)) if embeddings else dict(input_ids=ids)
    full_mask = torch.cat([torch.ones(batch, n_prefix, dtype=torch.long), mask], 1)
    out = decoded(model, *model.prefill(**inputs, attention_mask=full_mask, past_key_values=batch_prefix), new)
    for i, n in enumerate(lengths):
        alone = torch.cat([ids[i:i + 1, -n:], new[i:i + 1]], 1)[:, :-1]
        assert_close_rel(out[i], model(alone, past_key_values=prefix).logits[0, n - 1:])
