"""Our BLOOM against transformers': checkpoints written by one load in the other, and logits, loss, greedy
tokens, cached keys and classification scores agree, for power-of-two and other head counts (ALiBi's two
slope rules) and both residual layouts."""
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from safetensors.torch import load_file

from lowrank import models

from ..helpers import assert_close_rel, greedy_by_forward, left_padded, returned_cache

transformers = pytest.importorskip("transformers")

VOCAB = 96
RTOL = 1e-5  # fp32, relative to the largest logit
# eos None: generation runs its max_new_tokens, as the plain greedy loop it is compared with.
BASE = dict(vocab_size=VOCAB, hidden_size=48, n_layer=2, bos_token_id=VOCAB - 1, eos_token_id=None,
            initializer_range=0.3)  # a wide init keeps greedy choices away from ties
VARIANTS = {
    "4_heads": dict(n_head=4),
    "6_heads": dict(n_head=6),
    "12_heads": dict(n_head=12),
    "6_heads_residual_post_layernorm": dict(n_head=6, apply_residual_connection_post_layernorm=True),
}


def random_bloom(cls, seed=0, **config):
    """A transformers BLOOM whose biases and LayerNorms are random too (its init makes them 0 and the
    identity, which would hide a bias or norm loaded into the wrong place)."""
    torch.manual_seed(seed)
    hf = cls(transformers.BloomConfig(**{**BASE, **config})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.1)
    return hf


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, ours loaded from its save_pretrained folder)."""
    hf = random_bloom(transformers.BloomForCausalLM, **VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, models.from_pretrained(folder)



@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_logits_equal_transformers_with_and_without_padding(pair, lengths, seed):
    """Left padding, and masks with holes: only these tell key positions counted over real keys
    ((cumsum(mask) - 1) * mask) from slots, as ALiBi is blind to a shift shared by every real key."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(seed)
    ids, left = left_padded(lengths, gen, VOCAB - 1)
    holes = left * (torch.rand(left.shape, generator=gen) < 0.7)
    holes[:, -1] = 1
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, hf(ids).logits, rtol=RTOL)
        for mask in (left, holes):
            note(f"mask={mask.tolist()}")
            real = mask.bool()
            assert_close_rel(ours(ids, attention_mask=mask).logits[real], hf(ids, attention_mask=mask).logits[real],
                             rtol=RTOL)


def test_loss_equals_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (3, 10))
    labels = ids.masked_fill(torch.rand(3, 10) < 0.3, -100)
    with torch.no_grad():
        assert_close_rel(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss, rtol=RTOL)


def test_greedy_generation_equals_a_greedy_loop_over_transformers_forward(pair):
    hf, ours = pair
    ids, mask = left_padded([7, 3, 5], torch.Generator().manual_seed(1), VOCAB - 1)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=10), greedy_by_forward(hf, ids, mask, 10, position_ids=False))
    alone = ids[1:2, -3:]
    assert torch.equal(ours.generate(alone, max_new_tokens=10), greedy_by_forward(hf, alone, torch.ones_like(alone), 10, position_ids=False))


def test_cached_keys_and_values_are_transformers_and_a_prefix_in_them_means_the_same(pair):
    """past_key_values hold what transformers' cache holds, so a learned prefix (PEFT's prefix tuning, which
    extends attention_mask over it) shifts ALiBi's positions by its length in both."""
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        held = returned_cache(hf(ids, use_cache=True)).layers
        for layer, (k, v) in zip(held, ours(ids, use_cache=True).past_key_values):
            assert_close_rel(k, layer.keys, rtol=RTOL)
            assert_close_rel(v, layer.values, rtol=RTOL)
        heads, head_dim = ours.config.n_head, ours.config.hidden_size // ours.config.n_head
        prefix = [(torch.randn(2, heads, 3, head_dim), torch.randn(2, heads, 3, head_dim)) for _ in range(2)]
        mask = torch.ones(2, 3 + 6, dtype=torch.long)
        mask[1, 3:5] = 0  # left padding after the prefix
        cache = transformers.DynamicCache(ddp_cache_data=prefix, config=hf.config)
        real = mask[:, 3:].bool()
        assert_close_rel(ours(ids, past_key_values=prefix, attention_mask=mask).logits[real],
                         hf(ids, past_key_values=cache, attention_mask=mask).logits[real], rtol=RTOL)


def test_our_save_pretrained_loads_in_transformers(pair, tmp_path):
    hf, ours = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.BloomForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, hf(ids).logits, rtol=RTOL)
    assert reloaded.config.apply_residual_connection_post_layernorm == hf.config.apply_residual_connection_post_layernorm


def test_hub_layout_without_the_transformer_prefix_loads_with_a_tied_head(tmp_path):
    body = random_bloom(transformers.BloomModel, n_head=6)
    body.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert {"word_embeddings.weight", "h.0.self_attention.query_key_value.weight"} <= keys  # bigscience's layout
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        expected = body(ids).last_hidden_state @ body.word_embeddings.weight.T
        assert_close_rel(models.from_pretrained(tmp_path)(ids).logits, expected, rtol=RTOL)


def test_sharded_checkpoint_loads(tmp_path):
    hf = random_bloom(transformers.BloomForCausalLM, n_head=6)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert_close_rel(models.from_pretrained(tmp_path)(ids).logits, hf(ids).logits, rtol=RTOL)


@pytest.mark.parametrize("n_head", [4, 6])
def test_bfloat16_load_is_as_close_to_float32_as_transformers_bfloat16(tmp_path, n_head):
    """BLOOM's own init range: at 0.3 the attention is sharp enough that transformers' rounding of the scores
    to bf16 before its fp32 softmax (SDPA keeps them in fp32) alone moves the logits by ~2%."""
    hf = random_bloom(transformers.BloomForCausalLM, n_head=n_head, initializer_range=0.02)
    hf.save_pretrained(tmp_path)
    hf_bf16 = transformers.BloomForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = models.from_pretrained(tmp_path, dtype="bfloat16")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids, mask = left_padded([12, 7, 9], torch.Generator().manual_seed(2), VOCAB - 1)
    real = mask.bool()
    with torch.no_grad():
        exact = hf(ids, attention_mask=mask).logits[real]
        theirs = hf_bf16(ids, attention_mask=mask).logits[real].float()
        mine = ours(ids, attention_mask=mask).logits[real].float()
    assert_close_rel(mine, theirs, torch.bfloat16)
    scale = exact.abs().max()
    assert (mine - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3 * scale


@pytest.fixture(scope="module")
def classifier_pair(tmp_path_factory):
    """(transformers BloomForSequenceClassification with 3 labels and pad id 0, ours loaded from its folder)."""
    hf = random_bloom(transformers.BloomForSequenceClassification, n_head=6, num_labels=3, pad_token_id=0)
    folder = tmp_path_factory.mktemp("bloom_seq_cls")
    hf.save_pretrained(folder)
    ours = models.from_pretrained(folder)
    assert isinstance(ours, models.BloomForSequenceClassification)
    return hf, ours


def padded(rows, side):
    """Token rows of several lengths -> (ids, mask) (B, longest), padded with the pad token 0 on `side`."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    return ids, mask


def test_sequence_classification_equals_transformers_left_or_right_padded(classifier_pair):
    """Scores are read at each row's last real token, whose ALiBi positions do not depend on the padding side."""
    hf, ours = classifier_pair
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (9, 4, 6)]  # 0 is the pad token only
    labels = torch.tensor([0, 2, 1])
    logits = []
    for side in ("left", "right"):
        ids, mask = padded(rows, side)
        with torch.no_grad():
            expected, mine = hf(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
        assert mine.logits.shape == (3, 3)
        assert_close_rel(mine.logits, expected.logits, rtol=RTOL)
        assert_close_rel(mine.loss, expected.loss, rtol=RTOL)
        logits.append(mine.logits)
    assert_close_rel(logits[0], logits[1], rtol=RTOL)
