"""Our GPT-2 against transformers': checkpoints written by one load in the other, and logits, loss
and greedy tokens agree, across the config fields that change the math."""
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowrank import models

from ..helpers import assert_close_rel, greedy_by_forward, left_padded

transformers = pytest.importorskip("transformers")

VOCAB = 96
RTOL = 1e-4  # fp32, relative to the largest logit
BASE = dict(vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1, initializer_range=0.3)  # a wide init keeps greedy choices away from ties
VARIANTS = {
    "gelu_new": dict(),
    "gelu_inverse_layer_scale": dict(activation_function="gelu", scale_attn_by_inverse_layer_idx=True),
    "relu_unscaled_n_inner": dict(activation_function="relu", scale_attn_weights=False, n_inner=48),
    "pytorch_tanh_untied": dict(activation_function="gelu_pytorch_tanh", tie_word_embeddings=False),
    "upcast_eager_quick_gelu": dict(activation_function="quick_gelu", reorder_and_upcast_attn=True,
                                    layer_norm_epsilon=1e-3),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, ours loaded from its save_pretrained folder, the folder)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**BASE, **VARIANTS[request.param])
    config._attn_implementation = "eager" if config.reorder_and_upcast_attn else "sdpa"  # the flag acts in eager only
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, models.from_pretrained(folder), folder



@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_logits_equal_transformers_with_and_without_padding(pair, lengths, seed):
    hf, ours, _ = pair
    ids, mask = left_padded(lengths, torch.Generator().manual_seed(seed), VOCAB - 1)
    note(f"mask={mask.tolist()}")
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, hf(ids).logits, rtol=RTOL)
        real = mask.bool()
        assert_close_rel(ours(ids, attention_mask=mask).logits[real], hf(ids, attention_mask=mask).logits[real], rtol=RTOL)


def test_loss_equals_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (3, 10))
    labels = ids.masked_fill(torch.rand(3, 10) < 0.3, -100)
    with torch.no_grad():
        assert_close_rel(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss, rtol=RTOL)


def test_greedy_generation_equals_a_greedy_loop_over_transformers_forward(pair):
    """A left-padded batch and a row alone; eos VOCAB - 1 ends rows early, which then get pad 0."""
    hf, ours, _ = pair
    ids, mask = left_padded([7, 3, 5], torch.Generator().manual_seed(1), VOCAB - 1)
    kwargs = dict(max_new_tokens=10, eos_token_id=VOCAB - 1, pad_token_id=0)
    assert torch.equal(ours.generate(ids, mask, **kwargs), greedy_by_forward(hf, ids, mask, 10, VOCAB - 1, 0))
    row = ids[1:2, -3:]
    assert torch.equal(ours.generate(row, **kwargs), greedy_by_forward(hf, row, torch.ones_like(row), 10, VOCAB - 1, 0))


def test_our_save_pretrained_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, hf(ids).logits, rtol=RTOL)
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_unprefixed_gpt2model_checkpoint_with_mask_buffers_loads(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**BASE)
    body = transformers.GPT2Model(config).eval()
    body.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "h.0.attn.c_attn.weight" in tensors  # the Hub's gpt2 layout: no `transformer.` prefix
    for i in range(config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()[None]
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        expected = body(ids).last_hidden_state @ body.wte.weight.T
        assert_close_rel(models.from_pretrained(tmp_path)(ids).logits, expected, rtol=RTOL)


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**BASE)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert_close_rel(models.from_pretrained(tmp_path)(ids).logits, hf(ids).logits, rtol=RTOL)


def test_cpu_benchmark_runs_in_quick_mode(tmp_path):
    from bench.model_cpu import main

    rows = main(["--quick", "--repeats", "2", "--json", str(tmp_path / "model_cpu.json")])
    assert [row["metric"] for row in rows] == ["prefill_tokens_per_s", "decode_ms_per_token", "load_ms", "t5_generate_ms"]
    assert (tmp_path / "model_cpu.json").is_file()
