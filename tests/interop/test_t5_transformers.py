"""models.t5 against transformers' T5ForConditionalGeneration: files transformers writes load here with equal
logits, loss and greedy tokens, and files written here load back into transformers (docs/formats.md B, G.2)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank import models

from ..helpers import assert_close_rel, greedy_by_forward

transformers = pytest.importorskip("transformers")

# max_distance 12 < the 20-token inputs: the logarithmic and clamped buckets are exercised.
# initializer_factor 2 lets the blocks outweigh the residual embedding, so greedy tokens vary; it also
# amplifies fp32 rounding, which is why transformers runs its reference "eager" attention here (its
# "sdpa" path differs from its own eager one by up to 5e-5 relative on these models).
BASE = dict(vocab_size=100, d_model=48, d_kv=12, d_ff=96, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
            relative_attention_max_distance=12, dropout_rate=0.0, initializer_factor=2.0, decoder_start_token_id=0)
VARIANTS = {
    "relu-tied-scaled": dict(feed_forward_proj="relu"),
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=8, d_ff=64),
    "3-decoder-layers": dict(num_decoder_layers=3, relative_attention_num_buckets=8),
    "1-decoder-layer": dict(num_decoder_layers=1, relative_attention_num_buckets=32, d_model=64, d_kv=16, d_ff=128),
}


def reference(**kwargs):
    """A random transformers T5 with its eager attention."""
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, ours loaded from the folder transformers saved, that folder)."""
    torch.manual_seed(0)
    kwargs = {**BASE, **VARIANTS[request.param]}
    theirs = reference(**kwargs)
    if kwargs.get("tie_word_embeddings") is False:
        # transformers 5.x ties a fresh model anyway; a distinct lm_head is what flan-t5 checkpoints hold
        theirs.lm_head.weight = torch.nn.Parameter(torch.randn_like(theirs.shared.weight))
    path = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(path)
    return theirs, models.from_pretrained(path), path


def batch(seed=0, b=3, t_enc=20, t_dec=13):
    """Encoder rows with right padding, one left-padded; a decoder mask with right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (b, t_enc), generator=g)
    mask = torch.ones(b, t_enc, dtype=torch.long)
    mask[1, 14:] = 0
    mask[2, :9] = 0
    dec = torch.randint(2, 100, (b, t_dec), generator=g)
    dec_mask = torch.ones(b, t_dec, dtype=torch.long)
    dec_mask[0, 10:] = 0
    return ids, mask, dec, dec_mask


def test_loaded_model_keeps_transformers_tying_and_scaling(pair):
    theirs, ours, _ = pair
    assert (ours.lm_head.weight is ours.shared.weight) == (theirs.lm_head.weight is theirs.shared.weight)
    assert ours.config.scale_decoder_outputs == theirs.config.scale_decoder_outputs
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_logits_equal_transformers_with_padding_masks(pair):
    theirs, ours, _ = pair
    ids, mask, dec, dec_mask = batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        actual = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert_close_rel(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, rtol=1e-4)
    assert_close_rel(actual.logits, expected.logits, rtol=1e-4)


def test_loss_with_ignored_labels_equals_transformers(pair):
    theirs, ours, _ = pair
    ids, mask, labels, _ = batch(1)
    labels[0, 7:] = -100
    labels[2, 3] = -100
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        actual = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close_rel(actual.logits, expected.logits, rtol=1e-4)
    assert_close_rel(actual.loss, expected.loss, rtol=1e-4)


def test_greedy_generate_equals_a_greedy_loop_over_transformers_forward(pair):
    theirs, ours, _ = pair
    ids, mask, _, _ = batch(8, b=4)
    expected = greedy_by_forward(theirs, ids, mask, 12, eos=1, pad=0, decoder_start=theirs.config.decoder_start_token_id)
    actual = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=1, pad_token_id=0)
    assert torch.equal(actual, expected)


def test_saved_files_load_into_transformers_with_equal_logits(pair, tmp_path):
    theirs, ours, path = pair
    ours.save_pretrained(tmp_path)
    with safe_open(path / "model.safetensors", "pt") as a, safe_open(tmp_path / "model.safetensors", "pt") as b:
        assert set(b.keys()) == set(a.keys())
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.scale_decoder_outputs == theirs.config.scale_decoder_outputs
    ids, mask, dec, dec_mask = batch(3)
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        actual = reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert_close_rel(actual.logits, expected.logits, rtol=1e-4)


def test_transformers_4x_untied_config_loads_unscaled(tmp_path):
    """flan-t5 as 4.x wrote it: "tie_word_embeddings": false, no scale_decoder_outputs, lm_head in the file."""
    torch.manual_seed(1)
    theirs = reference(**BASE, feed_forward_proj="gated-gelu")
    theirs.lm_head.weight = torch.nn.Parameter(torch.randn_like(theirs.shared.weight))
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = models.from_pretrained(tmp_path)
    assert not theirs.config.scale_decoder_outputs
    assert not ours.config.scale_decoder_outputs and ours.lm_head.weight is not ours.shared.weight
    ids, mask, dec, dec_mask = batch(4)
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                         theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, rtol=1e-4)


def test_checkpoint_with_duplicate_and_legacy_keys_loads(tmp_path):
    """Older files: every tied copy saved, plus the EncDecAttention bias table transformers ignores."""
    torch.manual_seed(2)
    theirs = reference(**BASE)
    theirs.save_pretrained(tmp_path)
    tensors = {k: v.clone() for k, v in theirs.state_dict().items()}
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(16, 4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = models.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.shared.weight and ours.config.scale_decoder_outputs
    ids, mask, dec, _ = batch(5)
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                         theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, rtol=1e-4)
