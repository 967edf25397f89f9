"""LoraConfig: PEFT's fields and defaults, the JSON round trip, validation, and the module-matching rules
(docs/formats.md C.1, C.3, C.4, C.5)."""
import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank import LoraConfig, PeftConfig, config_from_dict, get_peft_model
from lowrank.targets import resolve_config

from .helpers import tiny_gpt2, tiny_t5


def test_defaults_are_peft_defaults():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.init_lora_weights) == (8, 8, 0.0, "none", True)
    assert (c.use_rslora, c.fan_in_fan_out, c.inference_mode, c.target_modules) == (False, False, False, None)
    assert (c.rank_pattern, c.alpha_pattern, c.peft_type) == ({}, {}, "LORA")
    assert isinstance(c, PeftConfig)


configs = st.builds(
    LoraConfig,
    r=st.integers(1, 64),
    lora_alpha=st.one_of(st.integers(1, 64), st.floats(0.5, 64)),
    lora_dropout=st.sampled_from([0.0, 0.1, 0.5]),
    target_modules=st.one_of(st.none(), st.just(".*attn.*"), st.lists(st.sampled_from(["q", "v", "c_attn", "wo"]),
                                                                      min_size=1, unique=True)),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    use_rslora=st.booleans(),
    init_lora_weights=st.sampled_from([True, False, "gaussian"]),
    task_type=st.sampled_from([None, "CAUSAL_LM", "SEQ_2_SEQ_LM"]),
    rank_pattern=st.dictionaries(st.sampled_from(["c_fc", r"h\.1\.attn"]), st.integers(1, 16), max_size=2),
    alpha_pattern=st.dictionaries(st.sampled_from(["q", "wo"]), st.integers(1, 64), max_size=2),
    modules_to_save=st.one_of(st.none(), st.just(["ln_f"])),
)


@given(configs)
def test_json_round_trip(config):
    text = json.dumps(config.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = config_from_dict(json.loads(text))
    assert back == config and type(back) is LoraConfig


def test_unknown_fields_warn_and_peft_only_fields_are_quiet():
    d = {**LoraConfig(r=4).to_dict(), "peft_version": "0.21.2", "megatron_core": "megatron.core", "use_dora": False,
         "lora_bias": False, "new_field": 1, "another": "x"}
    with pytest.warns(UserWarning, match=r"another.*new_field") as record:
        config = config_from_dict(d, source="adapter_config.json")
    assert len(record) == 1 and "adapter_config.json" in str(record[0].message)
    assert config.r == 4


@pytest.mark.parametrize("key, value", [("use_dora", True), ("lora_bias", True), ("layer_replication", [[0, 1]])])
def test_switched_on_peft_features_we_lack_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        config_from_dict({**LoraConfig().to_dict(), key: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r=0"),
    (dict(r=2.5), "r=2.5"),
    (dict(bias="some"), "bias='some'"),
    (dict(lora_dropout=1.0), "lora_dropout=1.0"),
    (dict(target_modules="(unclosed"), "target_modules='\\(unclosed'"),
    (dict(exclude_modules="[a-"), "exclude_modules"),
    (dict(alpha_pattern={"q": 0}), r"alpha_pattern\['q'\]=0"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\]=0"),
    (dict(rank_pattern={"(": 2}), "rank_pattern key"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(task_type="CHAT"), "task_type='CHAT'"),
    (dict(layers_pattern="h"), "layers_pattern='h'"),
    (dict(target_modules=".*q", layers_to_transform=[0]), "layers_to_transform"),
    (dict(layers_to_transform=[-1], target_modules=["q"]), "layers_to_transform"),
    (dict(use_rslora="false"), "use_rslora='false' must be true or false"),
    (dict(lora_alpha="abc"), "lora_alpha='abc' must be a number"),
    (dict(lora_alpha=float("nan")), "lora_alpha=nan must be a finite number"),
    (dict(r=True), "r=True must be an integer"),
    (dict(fan_in_fan_out=1), "fan_in_fan_out=1 must be true or false"),
    (dict(rank_pattern=[]), r"rank_pattern=\[\] must be an object"),
    (dict(layers_to_transform=[0], layers_pattern=[3], target_modules=["q"]), r"layers_pattern=\[3\]"),
    (dict(inference_mode="yes"), "inference_mode='yes'"),
])
def test_invalid_values_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("d, message", [({"r": 4}, "peft_type=None"), ({"peft_type": "IA3"}, "'IA3'")])
def test_config_from_dict_needs_a_known_peft_type(d, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(d)


def test_list_targets_match_whole_name_suffixes():
    c = LoraConfig(target_modules=["c_proj"])
    assert c.is_target("transformer.h.0.attn.c_proj") and c.is_target("transformer.h.0.mlp.c_proj")
    assert c.is_target("c_proj") and not c.is_target("transformer.h.0.attn.xc_proj")
    assert not LoraConfig(target_modules=["proj"]).is_target("transformer.h.0.attn.c_proj")


def test_regex_targets_use_fullmatch():
    c = LoraConfig(target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(q|v)")
    assert c.is_target("decoder.block.1.layer.1.EncDecAttention.v")
    assert not c.is_target("encoder.block.0.layer.0.SelfAttention.q")
    assert not c.is_target("decoder.block.0.layer.0.SelfAttention.qq")


def test_exclude_modules_and_modules_to_save_are_never_targets():
    c = LoraConfig(target_modules=["c_attn", "c_fc"], exclude_modules=["h.1.attn.c_attn"], modules_to_save=["c_fc"])
    assert c.is_target("transformer.h.0.attn.c_attn") and not c.is_target("transformer.h.1.attn.c_attn")
    assert not c.is_target("transformer.h.0.mlp.c_fc")
    assert not LoraConfig(target_modules=["q"], exclude_modules=".*decoder.*").is_target("decoder.block.0.layer.0.SelfAttention.q")


def test_layers_to_transform_reads_the_first_layer_index():
    c = LoraConfig(target_modules=["q"], layers_to_transform=[1], layers_pattern="block")
    assert c.is_target("encoder.block.1.layer.0.SelfAttention.q")
    assert not c.is_target("encoder.block.0.layer.1.SelfAttention.q")  # layer.1 is a sublayer, not the block
    plain = LoraConfig(target_modules=["c_attn"], layers_to_transform=0)
    assert plain.is_target("transformer.h.0.attn.c_attn") and not plain.is_target("transformer.h.1.attn.c_attn")


def test_rank_and_alpha_patterns_take_the_first_matching_key():
    c = LoraConfig(r=8, lora_alpha=16, rank_pattern={"c_fc": 2, "mlp.c_fc": 3}, alpha_pattern={r"h.1.attn.c_attn": 32})
    assert c.rank_and_alpha("transformer.h.0.mlp.c_fc") == (2, 16)
    assert c.rank_and_alpha("transformer.h.1.attn.c_attn") == (8, 32)
    assert c.rank_and_alpha("transformer.h.0.attn.c_attn") == (8, 16)
    assert c.rank_and_alpha("transformer.h.0.mlp.xc_fc") == (8, 16)  # a key matches whole name parts only


def test_default_targets_follow_the_model_type():
    gpt2 = get_peft_model(tiny_gpt2(), LoraConfig(fan_in_fan_out=True))
    assert gpt2.peft_config["default"].target_modules == ["c_attn"]
    t5 = get_peft_model(tiny_t5(), LoraConfig())
    keys = t5.adapter_tensors("default")
    assert len(keys) == 24  # q and v of encoder and decoder self-attention and of cross-attention (docs/formats.md C.4)
    assert any("EncDecAttention.q.lora_A" in k for k in keys)


def test_all_linear_skips_the_output_head():
    config, plan = resolve_config(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert sorted(plan) == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                  for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert config.fan_in_fan_out and config.target_modules == list(plan)
    _, plan = resolve_config(tiny_t5(), LoraConfig(target_modules="all-linear"))
    assert {name.rsplit(".", 1)[1] for name in plan} == {"q", "k", "v", "o", "wi", "wo"} and "lm_head" not in plan


def test_fan_in_fan_out_follows_the_layer_layout_warning_only_against_an_explicit_true():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default on GPT-2's Conv1D is nothing the user can act on
        config, _ = resolve_config(tiny_gpt2(), LoraConfig())
    assert config.fan_in_fan_out
    with pytest.warns(UserWarning, match="fan_in_fan_out=True does not match.*set to False"):
        config, _ = resolve_config(tiny_t5(), LoraConfig(fan_in_fan_out=True))
    assert not config.fan_in_fan_out


def test_targets_that_match_nothing_name_the_targets_and_some_modules():
    with pytest.raises(ValueError, match=r"\['q', 'v'\].*transformer\.h\.0\.attn\.c_attn"):
        resolve_config(tiny_gpt2(), LoraConfig(target_modules=["q", "v"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        resolve_config(tiny_gpt2(), LoraConfig(target_modules=["ln_1"]))
    with pytest.raises(ValueError, match="task_type='SEQ_2_SEQ_LM'"):
        resolve_config(tiny_gpt2(), LoraConfig(task_type="SEQ_2_SEQ_LM"))


def test_no_default_targets_for_an_unknown_model():
    with pytest.raises(ValueError, match="no default"):
        resolve_config(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig())
