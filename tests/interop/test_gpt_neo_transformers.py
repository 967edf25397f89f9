"""Our GPT-Neo against transformers': checkpoints written by one load in the other, and logits, loss, greedy
tokens past the local window and classification losses agree, across the config fields that change the math."""
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank import models

from ..helpers import assert_close_rel, greedy_by_forward

transformers = pytest.importorskip("transformers")

VOCAB = 96
RTOL = 1e-5  # fp32, relative to the largest logit
WINDOW = 4
BASE = dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_layers=4, num_heads=4,
            attention_types=[[["global", "local"], 2]], window_size=WINDOW, bos_token_id=None, eos_token_id=None,
            initializer_range=0.3)  # a wide init keeps greedy choices away from ties
VARIANTS = {
    "global_local": dict(),
    "local_first_untied_relu": dict(attention_types=[[["local", "global"], 2]], window_size=3, intermediate_size=48,
                                    activation_function="relu", tie_word_embeddings=False),
    "all_local_gelu": dict(attention_types=[[["local"], 4]], window_size=5, activation_function="gelu",
                           layer_norm_epsilon=1e-3),
}


def tiny_config(**overrides):
    return transformers.GPTNeoConfig(**{**BASE, **overrides})


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, ours loaded from its save_pretrained folder, the folder)."""
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(tiny_config(**VARIANTS[request.param])).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, models.from_pretrained(folder), folder


def padded(lengths, generator, left=True):
    """Random real tokens in [1, VOCAB) (0 is the pad token), padded to the longest: (ids, mask), each (B, T)."""
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    real = torch.arange(width) >= width - torch.tensor(lengths)[:, None]
    mask = (real if left else real.flip(-1)).long()
    return ids * mask, mask


@given(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_logits_equal_transformers_with_and_without_padding(pair, lengths, seed):
    hf, ours, _ = pair
    ids, mask = padded(lengths, torch.Generator().manual_seed(seed))
    note(f"mask={mask.tolist()}")
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, hf(ids).logits, rtol=RTOL)
        real = mask.bool()
        assert_close_rel(ours(ids, attention_mask=mask).logits[real], hf(ids, attention_mask=mask).logits[real],
                         rtol=RTOL)


def test_loss_equals_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (3, 12))
    labels = ids.masked_fill(torch.rand(3, 12) < 0.3, -100)
    with torch.no_grad():
        assert_close_rel(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss, rtol=RTOL)


def test_greedy_generation_past_the_window_equals_transformers_greedy_loop(pair):
    hf, ours, _ = pair
    steps = 10  # prompt + steps > 2 * window_size for every variant: decoding crosses the local window
    ids, mask = padded([5], torch.Generator().manual_seed(2))
    assert torch.equal(ours.generate(ids, max_new_tokens=steps), greedy_by_forward(hf, ids, mask, steps))
    ids, mask = padded([7, 3, 5], torch.Generator().manual_seed(1))
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=steps), greedy_by_forward(hf, ids, mask, steps))


def test_our_save_pretrained_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_layers == hf.config.attention_layers
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, hf(ids).logits, rtol=RTOL)


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(tiny_config()).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert_close_rel(models.from_pretrained(tmp_path)(ids).logits, hf(ids).logits, rtol=RTOL)


def test_bfloat16_load_is_as_close_to_float32_as_transformers_bfloat16(tmp_path):
    torch.manual_seed(0)
    # transformers' default init: at 0.3 this unscaled attention amplifies bf16 rounding past 1e-2 in both
    hf = transformers.GPTNeoForCausalLM(tiny_config(initializer_range=0.02)).eval()
    hf.save_pretrained(tmp_path)
    ids, mask = padded([12, 7, 10], torch.Generator().manual_seed(0))
    real = mask.bool()
    with torch.no_grad():
        reference = hf(ids, attention_mask=mask).logits[real]
        hf_bf16 = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        theirs = hf_bf16(ids, attention_mask=mask).logits[real]
        ours = models.from_pretrained(tmp_path, dtype="bfloat16")(ids, attention_mask=mask).logits[real]
    assert ours.dtype == torch.bfloat16
    assert_close_rel(ours, theirs, dtype=torch.bfloat16)
    # flash-attention's rule: no further from the float32 result than twice transformers' own bf16 error
    assert (ours.float() - reference).abs().max() <= 2 * (theirs.float() - reference).abs().max() + 1e-3


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """{num_labels: (transformers' GPTNeoForSequenceClassification, ours loaded from its folder)}, pad id 0."""
    out = {}
    for num_labels in (3, 1):
        torch.manual_seed(num_labels)
        hf = transformers.GPTNeoForSequenceClassification(tiny_config(num_labels=num_labels, pad_token_id=0)).eval()
        folder = tmp_path_factory.mktemp(f"seq_cls_{num_labels}")
        hf.save_pretrained(folder)
        out[num_labels] = hf, models.from_pretrained(folder)
    return out


def hf_loss(hf, ids, mask, labels):
    hf.config.problem_type = None  # transformers fixes it on the first call; each call here chooses afresh
    return hf(ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("left", [True, False], ids=["left_padded", "right_padded"])
def test_sequence_classification_equals_transformers(classifiers, left):
    hf, ours = classifiers[3]
    assert isinstance(ours, models.GPTNeoForSequenceClassification)
    ids, mask = padded([11, 4, 9], torch.Generator().manual_seed(3), left=left)
    class_ids = torch.tensor([0, 2, 1])
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
        assert logits.shape == (3, 3)
        assert_close_rel(logits, hf(ids, attention_mask=mask).logits, rtol=RTOL)
        for labels in (class_ids, multi_hot):
            assert_close_rel(ours(ids, attention_mask=mask, labels=labels).loss, hf_loss(hf, ids, mask, labels),
                             rtol=RTOL)
        hf, ours = classifiers[1]
        targets = torch.tensor([0.5, -1.0, 2.0])
        assert_close_rel(ours(ids, attention_mask=mask, labels=targets).loss, hf_loss(hf, ids, mask, targets),
                         rtol=RTOL)
