"""Fuzz of config.json and adapter_config.json: random JSON types and values in any field. Each draw either
loads a model that runs, or raises ConfigError / CheckpointError naming the file, and a model it was to be
loaded into is unchanged."""
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank import LoraConfig, PeftModel, get_peft_model, models
from lowrank.errors import CheckpointError, ConfigError

from .helpers import tiny_gpt2, tiny_t5

FUZZ_EXAMPLES = 4 * settings().max_examples  # cheap draws (a tiny model each); more of them find more

SCALARS = (st.none() | st.booleans() | st.integers(-3, 70) | st.integers(-2 ** 63, 2 ** 63)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["", "abc", "float33", "relu", "none",
                                                                              "all", "gelu_new", "true", "1"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["", "c_attn", ".*", "h.0", "x"]), inner, max_size=2), max_leaves=4)


def documents(base: dict):
    """A valid dict with up to three fields (known, or not) set to random JSON; or any JSON at all."""
    keys = st.sampled_from(sorted(base) + ["model_type", "architectures", "dtype", "torch_dtype", "unknown_key"])
    mutated = st.dictionaries(keys, JSON, min_size=1, max_size=3).map(lambda change: {**base, **change})
    return mutated | JSON


def _named(error: Exception, *files) -> bool:
    return isinstance(error, (ConfigError, CheckpointError)) and any(str(f) in str(error) for f in files)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5], ids=["gpt2", "t5"])
@settings(max_examples=FUZZ_EXAMPLES)
@given(data=st.data())
def test_a_fuzzed_config_json_loads_a_working_model_or_names_the_file(tmp_path_factory, make, data):
    folder = tmp_path_factory.mktemp("model")
    make().save_pretrained(folder)
    config_file = folder / "config.json"
    document = data.draw(documents(json.loads(config_file.read_text())))
    config_file.write_text(json.dumps(document))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = models.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        assert _named(e, config_file, folder / "model.safetensors"), f"{type(e).__name__}: {e}"
        return
    ids = torch.tensor([[0, 1]])
    out = model(input_ids=ids) if make is tiny_gpt2 else model(input_ids=ids, decoder_input_ids=ids)
    assert out.logits.shape == (1, 2, model.config.vocab_size)


def _snapshot(peft: PeftModel) -> tuple:
    return ([n for n, _ in peft.named_modules()], {k: v.clone() for k, v in peft.state_dict().items()},
            dict(peft.peft_config), peft.active_adapters)


def _unchanged(before: tuple, after: tuple) -> bool:
    return (before[0] == after[0] and before[2] == after[2] and before[3] == after[3]
            and before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1]))


@settings(max_examples=FUZZ_EXAMPLES)
@given(data=st.data())
def test_a_fuzzed_adapter_config_loads_or_names_the_file_and_leaves_the_model_as_it_was(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("adapter")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    get_peft_model(tiny_gpt2(seed=1), config).save_pretrained(folder)
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps(data.draw(documents(json.loads(config_file.read_text())))))
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_proj"]))
    before = _snapshot(peft)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.load_adapter(folder, adapter_name="fuzzed")
    except Exception as e:  # noqa: BLE001
        assert _named(e, config_file, folder / "adapter_model.safetensors"), f"{type(e).__name__}: {e}"
        assert _unchanged(before, _snapshot(peft))
        return
    peft.set_adapter("fuzzed")
    assert peft(input_ids=torch.tensor([[0, 1]])).logits.isfinite().all()
