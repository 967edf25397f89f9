"""Properties of models.t5 on its own: buckets, layout, config, KV cache and prefixes, padding, loss,
dropout, checkpoint hooks. Agreement with transformers' T5 is in tests/interop/test_t5_transformers.py.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank import models
from lowrank.errors import ConfigError
from lowrank.models.t5 import T5Config, T5ForConditionalGeneration, relative_position_bucket

from .helpers import assert_close_rel as assert_close

# max_distance 16 with 8 buckets: 20-token inputs reach the logarithmic and the clamped buckets.
TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)


def tiny_model(seed=0, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**{**TINY, **overrides})).eval()


MODEL = tiny_model()
GATED = tiny_model(1, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def random_batch(seed, batch, t_enc, t_dec, vocab=TINY["vocab_size"]):
    """Token ids (avoiding pad 0 and eos 1), an encoder mask with random right padding (row 0 full)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, t_enc), generator=g)
    lengths = torch.randint(1, t_enc + 1, (batch,), generator=g)
    lengths[0] = t_enc
    mask = (torch.arange(t_enc)[None] < lengths[:, None]).long()
    dec = torch.randint(2, vocab, (batch, t_dec), generator=g)
    return ids, mask, dec


def test_relative_buckets_match_mesh_tensorflow_sanity_values():
    def buckets(rel, bidirectional):
        return relative_position_bucket(torch.tensor(rel), bidirectional, 32, 128).tolist()

    assert buckets(list(range(-10, 11)), True) == [8, 8, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                                                   17, 18, 19, 20, 21, 22, 23, 24, 24, 24]
    assert buckets([8, 12, 16, 32, 64, 127, 128, 500], True) == [24, 25, 26, 28, 30, 31, 31, 31]
    assert buckets(list(range(0, -21, -1)), False) == list(range(16)) + [16, 16, 16, 17, 17]
    assert buckets([1, 5, 300], False) == [0, 0, 0]  # future keys: bucket 0, hidden by the causal mask


def test_parameter_names_are_transformers_state_dict_names():
    expected = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
                "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}
    for stack, n, layers in [("encoder", 2, ["SelfAttention", "DenseReluDense"]),
                             ("decoder", 3, ["SelfAttention", "EncDecAttention", "DenseReluDense"])]:
        expected.add(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for i in range(n):
            for j, name in enumerate(layers):
                expected.add(f"{stack}.block.{i}.layer.{j}.layer_norm.weight")
                ws = ["wi", "wo"] if name == "DenseReluDense" else ["q", "k", "v", "o"]
                expected |= {f"{stack}.block.{i}.layer.{j}.{name}.{w}.weight" for w in ws}
    assert set(MODEL.state_dict()) == expected
    # one embedding Parameter, reported once under transformers' name
    names = [n for n, _ in MODEL.named_parameters()]
    assert names[0] == "shared.weight" and not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert MODEL.lm_head.weight is MODEL.shared.weight is MODEL.encoder.embed_tokens.weight
    assert MODEL.state_dict()["encoder.block.0.layer.0.SelfAttention.q.weight"].shape == (32, 32)
    gated = set(GATED.state_dict())
    assert "decoder.block.2.layer.2.DenseReluDense.wi_0.weight" in gated and not any(".wi." in k for k in gated)
    assert GATED.lm_head.weight is not GATED.shared.weight
    linears = [m for n, m in MODEL.named_modules() if n.rsplit(".", 1)[-1] in {"q", "k", "v", "o", "wi", "wo"}]
    assert all(type(m) is torch.nn.Linear and m.bias is None for m in linears) and len(linears) == 2 * 6 + 3 * 10


def test_config_round_trips_and_resolves_defaults():
    raw = dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False, transformers_version="5.23.0",
               dense_act_fn="gelu_new", is_gated_act=True, model_type="t5",
               architectures=["T5ForConditionalGeneration"])
    config = T5Config.from_dict(raw)
    assert config.extra == {"transformers_version": "5.23.0"}
    assert (config.dense_act_fn, config.is_gated_act, config.scale_decoder_outputs) == ("gelu_new", True, False)
    assert config.to_dict() == {**T5Config().to_dict(), **raw, "scale_decoder_outputs": False}
    assert T5Config.from_dict(config.to_dict()) == config
    default = T5Config(num_layers=4, pad_token_id=5)
    assert (default.num_decoder_layers, default.decoder_start_token_id, default.scale_decoder_outputs) == (4, 5, True)
    assert T5Config(feed_forward_proj="gelu").dense_act_fn == "gelu"  # exact erf, unlike gated-gelu
    # transformers 5.x writes tie_word_embeddings true for every model; scale_decoder_outputs decides
    assert T5Config(tie_word_embeddings=True, scale_decoder_outputs=False).scale_decoder_outputs is False
    for bad in ["gelu-gated", "gated-gelu-x", "gated-nope"]:
        with pytest.raises(ValueError, match="feed_forward_proj"):
            T5Config(feed_forward_proj=bad)


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), t_enc=st.integers(1, 20), t_dec=st.integers(1, 12),
       gated=st.booleans())
def test_prefill_then_decode_steps_equal_full_forward(seed, batch, t_enc, t_dec, gated):
    note(f"batch={batch} t_enc={t_enc} t_dec={t_dec}")
    model = GATED if gated else MODEL
    ids, mask, dec = random_batch(seed, batch, t_enc, t_dec)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask,
                     decoder_input_ids=torch.cat([model.generation_prefix(ids), dec], dim=1)).logits
        cache, logits = model.prefill(ids, mask)
        steps = [logits] + [model.decode_step(cache, dec[:, i]) for i in range(t_dec)]
    assert_close(torch.stack(steps, dim=1), full)
    assert [t.shape[2] for t in cache.past_key_values[0]] == [t_dec + 1, t_dec + 1, t_enc, t_enc]


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), t_enc=st.integers(1, 20),
       chunks=st.lists(st.integers(1, 6), min_size=1, max_size=4), cross_cached=st.booleans())
def test_forward_with_past_key_values_in_chunks_equals_full(seed, batch, t_enc, chunks, cross_cached):
    """Also with a decoder padding mask over past + new keys, and with cross K/V left to be recomputed."""
    ids, mask, dec = random_batch(seed, batch, t_enc, sum(chunks))
    dec_mask = torch.ones_like(dec)
    dec_mask[-1, max(1, sum(chunks) - 2):] = 0
    with torch.no_grad():
        enc = MODEL(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :1]).encoder_last_hidden_state
        full = MODEL(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        past, parts, start = None, [], 0
        for n in chunks:
            out = MODEL(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, start:start + n],
                        decoder_attention_mask=dec_mask[:, :start + n], past_key_values=past, use_cache=True)
            past = out.past_key_values if cross_cached else [(k, v, None, None) for k, v, _, _ in out.past_key_values]
            parts.append(out.logits)
            start += n
    assert_close(torch.cat(parts, dim=1), full.logits)


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), t_enc=st.integers(1, 12), t_dec=st.integers(1, 6),
       n_prefix=st.integers(1, 4))
def test_prefill_with_a_prefix_and_embeddings_equals_full_forward_with_that_prefix(seed, batch, t_enc, t_dec, n_prefix):
    ids, mask, dec = random_batch(seed, batch, t_enc, t_dec)
    gen = torch.Generator().manual_seed(seed)
    prefix = [(torch.randn(batch, 4, n_prefix, 8, generator=gen), torch.randn(batch, 4, n_prefix, 8, generator=gen),
               None, None) for _ in range(3)]
    with torch.no_grad():
        full = MODEL(input_ids=ids, attention_mask=mask, past_key_values=prefix,
                     decoder_input_ids=torch.cat([MODEL.generation_prefix(ids), dec], dim=1)).logits
        cache, logits = MODEL.prefill(inputs_embeds=MODEL.get_input_embeddings()(ids), attention_mask=mask,
                                      past_key_values=prefix)
        steps = [logits] + [MODEL.decode_step(cache, dec[:, i]) for i in range(t_dec)]
    assert_close(torch.stack(steps, dim=1), full)


def test_prefix_keys_hidden_by_decoder_attention_mask_do_not_matter():
    """Self K/V longer than the decoder tokens (a learned prefix): keys masked out change nothing."""
    ids, mask, dec = random_batch(3, 2, 7, 5)
    torch.manual_seed(3)
    prefix = [(torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), None, None) for _ in range(3)]
    dec_mask = torch.ones(2, 6 + 5, dtype=torch.long)
    dec_mask[:, 1:3] = 0
    perturbed = [(k.clone(), v.clone(), None, None) for k, v, _, _ in prefix]
    for k, v, _, _ in perturbed:
        k[:, :, 1:3] += 5.0
        v[:, :, 1:3] -= 5.0
    with torch.no_grad():
        outs = [MODEL(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                      past_key_values=p, use_cache=True) for p in (prefix, perturbed)]
        unmasked = MODEL(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, past_key_values=prefix)
    assert_close(outs[1].logits, outs[0].logits)
    assert not torch.allclose(unmasked.logits, outs[0].logits)
    assert outs[0].past_key_values[0][0].shape == (2, 4, 11, 8) and outs[0].past_key_values[0][2].shape == (2, 4, 7, 8)
    with pytest.raises(ValueError, match=r"shape \(2, 5\), expected \(2, 11\)"):
        MODEL(input_ids=ids, decoder_input_ids=dec, decoder_attention_mask=torch.ones(2, 5), past_key_values=prefix)
    with pytest.raises(ValueError, match="exactly one of decoder_input_ids or decoder_inputs_embeds"):
        MODEL(input_ids=ids)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_encoder_batch_equals_unpadded_rows(side):
    """Relative positions make left padding as harmless as right padding."""
    torch.manual_seed(0)
    lengths, t_enc = [20, 13, 4], 20
    rows = [torch.randint(2, 64, (n,)) for n in lengths]
    dec = torch.randint(2, 64, (3, 6))
    pad = [(0, t_enc - len(r)) if side == "right" else (t_enc - len(r), 0) for r in rows]
    ids = torch.stack([F.pad(r, p) for r, p in zip(rows, pad)])
    mask = torch.stack([F.pad(torch.ones_like(r), p) for r, p in zip(rows, pad)])
    with torch.no_grad():
        batched = GATED(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for i, r in enumerate(rows):
            assert_close(batched[i], GATED(input_ids=r[None], decoder_input_ids=dec[i:i + 1]).logits[0])


def test_loss_shifts_labels_right_and_ignores_minus_100():
    ids, mask, _ = random_batch(5, 2, 9, 1)
    labels = torch.tensor([[5, 6, 7, 8, -100, -100], [9, -100, 10, 11, 12, 13]])
    out = MODEL(input_ids=ids, attention_mask=mask, labels=labels)
    dec = torch.tensor([[0, 5, 6, 7, 8, 0], [0, 9, 0, 10, 11, 12]])  # start token, -100 -> pad
    logits = MODEL(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    keep = labels != -100
    assert_close(out.logits, logits)
    assert_close(out.loss, F.cross_entropy(logits[keep], labels[keep]))
    out.loss.backward()
    grads = {n: p.grad for n, p in MODEL.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    MODEL.zero_grad(set_to_none=True)


def test_dropout_only_in_train_mode():
    ids, mask, dec = random_batch(0, 2, 8, 5)
    model = tiny_model(dropout_rate=0.5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=dec).logits,
                           MODEL(input_ids=ids, decoder_input_ids=dec).logits)
        model.train()
        a, b = (model(input_ids=ids, decoder_input_ids=dec).logits for _ in range(2))
    assert not torch.allclose(a, b)


def test_normalize_checkpoint_fills_and_unties_embeddings():
    config = T5Config(**TINY)
    full = MODEL.checkpoint_state_dict()
    emb = full["shared.weight"]
    sd = T5ForConditionalGeneration.normalize_checkpoint(full, config)
    assert set(sd) == set(MODEL.state_dict()) and config.tie_word_embeddings
    assert all(sd[k] is emb for k in ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"])
    # madlad-style: no shared, separate lm_head; plus a legacy key transformers ignores and one unknown key
    other = {k: v for k, v in full.items() if k != "shared.weight"}
    other.update({"encoder.embed_tokens.weight": emb, "decoder.embed_tokens.weight": emb, "lm_head.weight": emb + 1,
                  "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": torch.zeros(8, 4),
                  "surprise.weight": torch.zeros(1)})
    sd = T5ForConditionalGeneration.normalize_checkpoint(other, config)
    assert sd["shared.weight"] is emb and torch.equal(sd["lm_head.weight"], emb + 1)
    assert not config.tie_word_embeddings and config.scale_decoder_outputs  # untied as transformers does; scale kept
    assert set(sd) == set(MODEL.state_dict()) | {"surprise.weight"}  # unknown keys reach the loader's check
    with pytest.raises(ValueError, match="shared.weight"):
        T5ForConditionalGeneration.normalize_checkpoint({"lm_head.weight": emb}, config)


def test_checkpoint_state_dict_writes_tied_embedding_once():
    assert set(MODEL.state_dict()) - set(MODEL.checkpoint_state_dict()) == {
        "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert "lm_head.weight" in GATED.checkpoint_state_dict()


@pytest.mark.parametrize("model", [MODEL, GATED], ids=["tied", "untied"])
def test_save_then_from_pretrained_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = models.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == {**model.config.to_dict(), "dtype": "float32"}
    assert (loaded.lm_head.weight is loaded.shared.weight) == (model.lm_head.weight is model.shared.weight)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight is loaded.decoder.embed_tokens.weight
    ids, mask, dec = random_batch(1, 2, 10, 4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                           model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_greedy_generate_equals_argmax_of_full_recomputation():
    ids, mask, _ = random_batch(11, 3, 12, 1)
    tokens = MODEL.generate(ids, mask, max_new_tokens=8)
    dec = MODEL.generation_prefix(ids)
    with torch.no_grad():
        for _ in range(8):
            next_token = MODEL(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1].argmax(-1)
            dec = torch.cat([dec, next_token[:, None]], dim=1)
    assert torch.equal(tokens, dec)


@pytest.mark.parametrize("inputs, message", [
    (dict(input_ids=torch.tensor([[1, 64]]), decoder_input_ids=torch.tensor([[0]])), r"input_ids\[0, 1\] = 64"),
    (dict(input_ids=torch.tensor([[1]]), decoder_input_ids=torch.tensor([[-3]])), r"decoder_input_ids\[0, 0\] = -3"),
    (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(3, 2), decoder_input_ids=torch.tensor([[0]])),
     r"attention_mask has shape \(3, 2\), expected \(1, 2\)"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long), decoder_input_ids=torch.tensor([[0]])), r"shape \(1, 0\)"),
    (dict(input_ids=torch.tensor([[1]]), labels=torch.tensor([[99]])), r"labels\[0, 0\] = 99"),
    (dict(input_ids=torch.tensor([[1]]), decoder_input_ids=torch.tensor([[0, 1]]),
          decoder_attention_mask=torch.ones(1, 3)), r"decoder_attention_mask has shape \(1, 3\), expected \(1, 2\)"),
])
def test_bad_inputs_raise_naming_the_argument_and_value(inputs, message):
    with pytest.raises(ValueError, match=message):
        MODEL(**inputs)


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=0), "num_heads=0 must be >= 1"), (dict(d_kv="8"), "d_kv='8' must be an integer"),
    (dict(dropout_rate=1.5), "dropout_rate=1.5 must be in [0, 1)"), (dict(feed_forward_proj="gated-x"), "gated-x"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings='no' must be true or false"),
])
def test_config_rejects_bad_values_naming_the_field(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        T5Config(**{**TINY, **bad})
