"""generate(..., cache_implementation="static", compile=...): generation on a StaticCache (models.cache), whose
decode step torch.compile traces as one graph.

- a StaticCache's masks are the dynamic cache's over the slots written so far, and hide every later slot;
- its greedy tokens are the dynamic cache's, eagerly and compiled, for every decoder (GPT-2, GPT-Neo past its
  window, BLOOM's ALiBi, Llama's biases and dynamic RoPE past max_position_embeddings, Qwen2's and Mistral's
  windows with GQA), T5's decoder, left-padded batches, LoRA, prefix and prompt tuning, and sampling;
- the compiled step is one graph with no recompiles over 64 steps and prompts of several lengths, padded or not.

Compiled tests use backend="aot_eager" (dynamo's tracing and AOT autograd, no code generation), one small
test inductor, one (CUDA only) mode="reduce-overhead".
"""
import copy
import functools

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from examples.common import tiny_gpt2 as tiny_gpt2_for
from lowrank import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from lowrank.cli import main
from lowrank.models import word_tokenizer
from lowrank.models.cache import KVCache, StaticCache, static_cache_len
from lowrank.models.masks import attention_mask_for

from .helpers import left_padded, tiny_gpt2, tiny_t5
from .test_decoder_cache import DECODERS, VOCAB

AOT = {"backend": "aot_eager"}
STEPS = 64
# Room for a prompt and STEPS new tokens; Llama's max_position_embeddings stays 64, so dynamic RoPE scales.
POSITIONS = {"gpt2": dict(n_positions=96), "gpt_neo_window": dict(max_position_embeddings=96)}


@functools.cache
def decoder(name: str):
    """DECODERS[name] built from seed 0, in eval mode, with POSITIONS."""
    model_class, config_class, config = DECODERS[name]
    torch.manual_seed(0)
    return model_class(config_class(**{**config, **POSITIONS.get(name, {})})).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No graphs compiled and nothing counted before each test."""
    torch._dynamo.reset()
    counters.clear()


def assert_one_graph_no_recompiles():
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"], (counters["recompiles"],
                                                                       counters["graph_break"])


def prompts(lengths, seed=0, vocab=VOCAB):
    """Left-padded ids (B, max(lengths)) with a mask, or with None when no row is padded."""
    ids, mask = left_padded(list(lengths), torch.Generator().manual_seed(seed), vocab)
    return ids * mask, None if bool(mask.all()) else mask


def dense(mask_and_causal, n_new: int, n_keys: int) -> torch.Tensor:
    """attention_mask_for's (attn_mask, is_causal) as a bool mask (B or 1, 1, n_new, n_keys)."""
    attn_mask, is_causal = mask_and_causal
    if attn_mask is None:
        attn_mask = torch.ones(n_new, n_keys, dtype=torch.bool).tril(n_keys - n_new) if is_causal else \
            torch.ones(n_new, n_keys, dtype=torch.bool)
    return attn_mask if attn_mask.dim() == 4 else attn_mask[None, None]


@given(n_past=st.integers(0, 12), n_new=st.integers(1, 6), spare=st.integers(0, 5),
       window=st.one_of(st.none(), st.integers(1, 8)), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_static_masks_are_the_dynamic_masks_over_the_written_slots_and_hide_the_rest(n_past, n_new, spare, window,
                                                                                     padded, seed):
    n_keys, batch = n_past + n_new, 3
    key_mask = torch.rand(batch, n_keys, generator=torch.Generator().manual_seed(seed)) > 0.3 if padded else None
    dynamic = KVCache(1, batch, 1, 1, n_keys, torch.float32, "cpu", key_mask)
    dynamic.advance(n_past)
    static = StaticCache(1, batch, 1, 1, n_keys + spare, torch.float32, "cpu", key_mask)
    static.advance(n_past)
    expected = dense(attention_mask_for(dynamic, dynamic.key_mask_for(n_new), n_new, "cpu", window), n_new, n_keys)
    attn_mask, is_causal = attention_mask_for(static, static.key_mask_for(n_new), n_new, "cpu", window)
    assert not is_causal and attn_mask.shape == (batch, 1, n_new, n_keys + spare)
    assert torch.equal(attn_mask[..., :n_keys], expected.expand(batch, 1, n_new, n_keys))
    assert not attn_mask[..., n_keys:].any()


@given(needed=st.integers(1, 5000), limit=st.one_of(st.none(), st.integers(1, 5000)))
def test_static_cache_len_is_a_power_of_two_bucket_capped_by_the_positions(needed, limit):
    limit = None if limit is None else max(limit, needed)
    length = static_cache_len(needed, limit=limit)
    bucket = max(256, 1 << (needed - 1).bit_length())
    assert length == (bucket if limit is None else min(bucket, limit)) and length >= needed
    assert static_cache_len(needed, max_cache_len=needed + 3) == needed + 3


@given(name=st.sampled_from(sorted(DECODERS)), lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       steps=st.integers(1, 12), exact=st.booleans(), seed=st.integers(0, 2**16))
def test_eager_generation_on_a_static_cache_equals_the_dynamic_cache(name, lengths, steps, exact, seed):
    """exact: max_cache_len is just what the prompt and the new tokens but the last need."""
    model, (ids, mask) = decoder(name), prompts(lengths, seed)
    note(f"{name}: ids {tuple(ids.shape)}, padded {mask is not None}")
    length = ids.shape[1] + steps - 1 if exact else None
    static = model.generate(ids, mask, max_new_tokens=steps, cache_implementation="static", max_cache_len=length)
    assert torch.equal(static, model.generate(ids, mask, max_new_tokens=steps))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_compiled_decode_is_one_graph_over_steps_and_prompts_and_gives_the_eager_tokens(name):
    model = decoder(name)
    for lengths in [(3, 7), (9, 9), (1, 5)]:
        ids, mask = prompts(lengths)
        compiled = model.generate(ids, mask, max_new_tokens=STEPS, cache_implementation="static", compile=AOT)
        assert torch.equal(compiled, model.generate(ids, mask, max_new_tokens=STEPS)), lengths
    assert_one_graph_no_recompiles()


def test_t5_compiled_decode_is_one_graph_over_encoder_lengths_and_gives_the_eager_tokens():
    """Encoder inputs of 7, 9 and 12 tokens: the cross keys are padded to 16 for one shape."""
    model = tiny_t5(eos_token_id=0)
    for lengths in [(3, 7), (9, 9), (1, 12)]:
        ids, mask = prompts(lengths, vocab=model.config.vocab_size)
        compiled = model.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=None,
                                  cache_implementation="static", compile=AOT)
        assert torch.equal(compiled, model.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=None)), lengths
    assert_one_graph_no_recompiles()


def test_t5_generation_on_a_static_cache_equals_the_dynamic_cache():
    model = tiny_t5()
    for lengths in [(3, 7), (20, 2)]:
        ids, mask = prompts(lengths, vocab=model.config.vocab_size)
        static = model.generate(ids, mask, max_new_tokens=30, eos_token_id=None, cache_implementation="static")
        assert torch.equal(static, model.generate(ids, mask, max_new_tokens=30, eos_token_id=None)), lengths


def with_random_lora(model):
    """get_peft_model with LoRA on GPT-2's attention and MLP, lora_B random (0 would leave the base model)."""
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"])).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return peft


def test_lora_compiled_decode_is_one_graph_and_gives_the_eager_tokens():
    peft = with_random_lora(tiny_gpt2(n_positions=96))
    ids, mask = prompts((3, 7), vocab=64)
    eager = peft.generate(ids, mask, max_new_tokens=STEPS)
    with peft.disable_adapter():
        assert not torch.equal(peft.generate(ids, mask, max_new_tokens=STEPS), eager)  # the adapter matters
    assert torch.equal(peft.generate(ids, mask, max_new_tokens=STEPS, cache_implementation="static", compile=AOT),
                       eager)
    assert_one_graph_no_recompiles()


def test_mixed_adapter_compiled_decode_is_one_graph_and_gives_the_eager_tokens():
    """adapter_names: each row its own adapter (or the base) through every compiled step."""
    peft = with_random_lora(tiny_gpt2(n_positions=96))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    ids, mask = prompts((3, 7, 5), vocab=64)
    names = ["other", "default", "__base__"]
    eager = peft.generate(ids, mask, max_new_tokens=STEPS, adapter_names=names)
    assert len({tuple(row) for row in eager[:, -STEPS:].tolist()}) == 3  # three different continuations
    compiled = peft.generate(ids, mask, max_new_tokens=STEPS, adapter_names=names, cache_implementation="static",
                             compile=AOT)
    assert torch.equal(compiled, eager)
    assert_one_graph_no_recompiles()


@pytest.mark.parametrize("config", [PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                                    PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")],
                         ids=["prefix", "prompt"])
def test_prompt_learning_compiled_decode_gives_the_eager_tokens(config):
    """A learned prefix is loaded into the static cache's first slots; a soft prompt enters at prefill."""
    peft = get_peft_model(tiny_gpt2(n_positions=96), config).eval()
    ids, mask = prompts((3, 7), vocab=64)
    compiled = peft.generate(ids, mask, max_new_tokens=20, cache_implementation="static", compile=AOT)
    assert torch.equal(compiled, peft.generate(ids, mask, max_new_tokens=20))
    assert_one_graph_no_recompiles()


def test_sampling_on_a_compiled_static_cache_draws_the_dynamic_cache_tokens():
    model, (ids, mask) = decoder("llama_biases"), prompts((3, 7))
    options = dict(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=3)
    sampled = model.generate(ids, mask, **options)
    assert not torch.equal(sampled, model.generate(ids, mask, max_new_tokens=20))  # sampling, not the argmax
    assert torch.equal(model.generate(ids, mask, cache_implementation="static", compile=AOT, **options), sampled)


def test_cli_generate_compile_prints_the_eager_generation_through_inductor(tmp_path, capsys):
    """`lowrank generate --compile`: compile=True, torch.compile's defaults (inductor) on the CPU."""
    tokenizer = word_tokenizer("one two three four five six".split(), tmp_path)
    tiny_gpt2_for(tokenizer, n_embd=32).save_pretrained(tmp_path)
    argv = ["generate", str(tmp_path), "--prompt", "one two", "--max-new-tokens", "6"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main(argv + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert_one_graph_no_recompiles()


@pytest.mark.cuda
def test_reduce_overhead_cuda_graphs_give_the_eager_tokens_without_recompiling():
    """compile=True on CUDA: mode="reduce-overhead", the step replayed as a CUDA graph."""
    model = copy.deepcopy(decoder("mistral_window")).cuda()
    for lengths in [(3, 7), (9, 2)]:
        ids, mask = (t if t is None else t.cuda() for t in prompts(lengths))
        compiled = model.generate(ids, mask, max_new_tokens=STEPS, cache_implementation="static", compile=True)
        assert torch.equal(compiled, model.generate(ids, mask, max_new_tokens=STEPS)), lengths
    assert_one_graph_no_recompiles()


def test_compile_needs_a_static_cache_and_options_are_checked():
    model, (ids, mask) = decoder("gpt2"), prompts((3,))
    for kwargs, named in [(dict(compile=True), "compile needs cache_implementation='static'"),
                          (dict(cache_implementation="sliding"), "cache_implementation='sliding'"),
                          (dict(cache_implementation="static", compile="yes"), "compile='yes'"),
                          (dict(cache_implementation="static", max_cache_len=4), "max_cache_len=4")]:
        with pytest.raises(ValueError, match=named):
            model.generate(ids, mask, max_new_tokens=5, **kwargs)


def test_a_static_cache_refuses_a_generation_past_the_positions_before_decoding():
    """GPT-2 with 96 positions: a 3-token prompt and 95 new tokens would feed 97."""
    with pytest.raises(ValueError, match="longer than n_positions=96"):
        decoder("gpt2").generate(*prompts((3,)), max_new_tokens=95, cache_implementation="static")
    assert decoder("gpt2").generate(*prompts((3,)), max_new_tokens=94, cache_implementation="static").shape[1] == 97
