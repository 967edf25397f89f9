"""Properties of models.gpt2 on its own: layout, config, masks, loss, dropout, limits.

KV cache and padding: tests/test_decoder_cache.py, over every decoder.
Agreement with transformers' GPT-2 is in tests/interop/test_gpt2_transformers.py.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from lowrank.errors import ConfigError
from lowrank.models.gpt2 import Conv1D, GPT2Config, GPT2LMHeadModel

from .helpers import assert_close_rel as assert_close

TINY = dict(vocab_size=50, n_positions=48, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3)


def tiny_model(seed=0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_conv1d_computes_x_times_in_out_weight_plus_bias():
    conv = Conv1D(5, 7)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, 5)
    assert conv.weight.shape == (5, 7) and (conv.in_features, conv.out_features) == (5, 7)
    assert_close(conv(x), x @ conv.weight + conv.bias)


def test_parameter_names_are_transformers_state_dict_names(model):
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    for i in range(2):
        for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected |= {f"transformer.h.{i}.{name}.weight", f"transformer.h.{i}.{name}.bias"}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_untied_model_has_its_own_lm_head():
    model = tiny_model(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert "lm_head.weight" in model.checkpoint_state_dict()


def test_config_round_trips_unknown_keys_and_names_the_model_type():
    d = {**TINY, "n_ctx": 48, "summary_type": "cls_index", "model_type": "gpt2"}
    config = GPT2Config.from_dict(d)
    assert config.extra == {"n_ctx": 48, "summary_type": "cls_index"}
    out = config.to_dict()
    assert out["model_type"] == "gpt2" and out["architectures"] == ["GPT2LMHeadModel"]
    assert {k: out[k] for k in d} == d
    assert GPT2Config.from_dict(out) == config


@pytest.mark.parametrize("bad, field", [(dict(n_embd=30), "n_embd"), (dict(activation_function="gelu_x"), "activation_function"),
                                        (dict(add_cross_attention=True), "add_cross_attention"),
                                        (dict(n_layer=0), "n_layer=0 must be >= 1"), (dict(n_head=-2), "n_head=-2"),
                                        (dict(n_embd="32"), "n_embd='32' must be an integer"),
                                        (dict(n_layer=2.0), "n_layer=2.0"), (dict(attn_pdrop=1.0), "attn_pdrop=1.0"),
                                        (dict(scale_attn_weights="true"), "scale_attn_weights='true' must be true or false"),
                                        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon=0.0 must be > 0"),
                                        (dict(extra={"dtype": "float33"}), "dtype='float33'")])
def test_config_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        GPT2Config(**{**TINY, **bad})


@pytest.mark.parametrize("inputs, error, message", [
    (dict(input_ids=torch.tensor([[1, 50]])), ValueError, r"input_ids\[0, 1\] = 50 is outside the vocabulary \[0, 50\)"),
    (dict(input_ids=torch.tensor([[-1]])), ValueError, r"input_ids\[0, 0\] = -1"),
    (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), ValueError, r"shape \(0, 3\): needs at least one row"),
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, r"shape \(2, 0\)"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "input_ids must hold integer token ids"),
    (dict(input_ids=torch.tensor([1, 2])), ValueError, r"input_ids has shape \(2,\): expected \(batch, sequence\)"),
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    (dict(inputs_embeds=torch.zeros(1, 2, 31)), ValueError, r"inputs_embeds has shape \(1, 2, 31\)"),
    (dict(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[47, 48]])), ValueError,
     r"position_ids holds 47..48, outside \[0, n_positions=48\)"),
    (dict(input_ids=torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, 99]])), ValueError, "token_type_ids"),
    (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), ValueError, r"labels has shape \(1, 3\)"),
    (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[-100, 50]])), ValueError, r"labels\[0, 1\] = 50"),
])
def test_bad_inputs_raise_naming_the_argument_and_value(model, inputs, error, message):
    with pytest.raises(error, match=message):
        model(**inputs)


def test_attention_mask_hides_masked_past_keys(model):
    ids = torch.randint(0, 50, (1, 9))
    out = model(ids[:, :6], use_cache=True)
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[0, 2] = 0
    with_mask = model(ids[:, 6:], past_key_values=out.past_key_values, attention_mask=mask).logits
    without = model(ids[:, 6:], past_key_values=out.past_key_values).logits
    dropped = [(k[:, :, [0, 1, 3, 4, 5]], v[:, :, [0, 1, 3, 4, 5]]) for k, v in out.past_key_values]
    shifted = model(ids[:, 6:], past_key_values=dropped, position_ids=torch.arange(6, 9)[None]).logits
    assert_close(with_mask, shifted)
    assert not torch.allclose(with_mask, without)


def test_gradients_reach_learned_past_key_values(model):
    prefix = [(torch.randn(2, 4, 3, 8, requires_grad=True), torch.randn(2, 4, 3, 8, requires_grad=True)) for _ in range(2)]
    ids = torch.randint(0, 50, (2, 5))
    out = model(ids, past_key_values=prefix, attention_mask=torch.ones(2, 8), labels=ids)
    out.loss.backward()
    assert all(k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0 for k, v in prefix)


def test_loss_is_mean_shifted_cross_entropy_ignoring_minus_100(model):
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[0, 3] = labels[1, :4] = -100
    out = model(ids, labels=labels)
    logits, targets = out.logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)
    keep = targets != -100
    assert_close(out.loss, F.cross_entropy(logits[keep], targets[keep]))


def test_inputs_embeds_and_token_type_ids_follow_transformers(model):
    ids, types = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))
    wte = model.transformer.wte
    assert_close(model(inputs_embeds=wte(ids)).logits, model(ids).logits)
    assert_close(model(ids, token_type_ids=types).logits, model(inputs_embeds=wte(ids) + wte(types)).logits)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=wte(ids))


def test_dropout_is_active_in_train_mode_only():
    model = tiny_model(attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)
    ids = torch.randint(0, 50, (2, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    assert_close(tiny_model(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).train()(ids).logits, tiny_model()(ids).logits)


def test_input_longer_than_n_positions_raises_naming_both_sizes(model):
    with pytest.raises(ValueError, match=r"49 tokens.*n_positions=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    past = model(torch.zeros(1, 40, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"50 tokens \(40 past \+ 10 new\).*n_positions=48"):
        model(torch.zeros(1, 10, dtype=torch.long), past_key_values=past)
    cache, _ = model.prefill(torch.zeros(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions=48"):
        model.decode_step(cache, torch.zeros(1, dtype=torch.long))


def test_attention_mask_of_the_wrong_width_is_rejected(model):
    past = model(torch.zeros(1, 4, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), expected \(1, 7\)"):
        model(torch.zeros(1, 3, dtype=torch.long), past_key_values=past, attention_mask=torch.ones(1, 3))


def test_reorder_and_upcast_attn_changes_precision_only():
    ids = torch.randint(0, 50, (2, 10))
    upcast = tiny_model(reorder_and_upcast_attn=True)
    assert_close(upcast(ids).logits, tiny_model()(ids).logits)
    assert upcast.to(torch.bfloat16)(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("inputs, message", [
    (dict(attention_mask=torch.tensor([[1, 2]])), r"attention_mask must hold 0 \(padding\) and 1"),
    (dict(attention_mask=torch.tensor([[1.0, float("nan")]])), "attention_mask must hold 0"),
    (dict(past_key_values=[(torch.zeros(1, 4, 3, 7), torch.zeros(1, 4, 3, 7))] * 2, attention_mask=None),
     r"past_key_values\[0\]\[0\] has shape \(1, 4, 3, 7\)"),
    (dict(past_key_values=torch.zeros(2, 2)), "past_key_values has"),
    (dict(position_ids=[[0, 1]]), "position_ids must be an int64 or int32 tensor"),
])
def test_bad_masks_and_caches_are_named(model, inputs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model(input_ids=torch.tensor([[1, 2]]), **inputs)
