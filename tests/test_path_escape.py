"""Every name that becomes a path stays inside its folder: adapter names (a subfolder of save_pretrained's
directory) are refused before the model changes, and file names read from files (a shard index's
weight_map) must be plain names in the checkpoint's folder."""
import json

import pytest
from safetensors.torch import save_file

from lowrank import LoraConfig, PrefixTuningConfig, get_peft_model, models
from lowrank.errors import CheckpointError

from .helpers import tiny_gpt2

ESCAPING = ["../outside", "/tmp/absolute", "a/b", "..", ".", "a.b", "", "a\\b"]


def _module_names(model):
    return [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("name", ESCAPING)
@pytest.mark.parametrize("config", [LoraConfig(r=2, target_modules=["c_attn"]), PrefixTuningConfig(num_virtual_tokens=3)],
                         ids=["lora", "prefix"])
def test_get_peft_model_refuses_an_adapter_name_that_is_not_a_plain_name(name, config):
    model = tiny_gpt2()
    before = _module_names(model)
    with pytest.raises(ValueError, match="adapter name"):
        get_peft_model(model, config, adapter_name=name)
    assert _module_names(model) == before


@pytest.mark.parametrize("name", ESCAPING)
def test_add_and_load_adapter_refuse_it_before_anything_changes(tmp_path, name):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    peft.save_pretrained(tmp_path)
    before = _module_names(peft)
    with pytest.raises(ValueError, match="adapter name"):
        peft.add_adapter(name, LoraConfig(r=2, target_modules=["c_proj"]))
    with pytest.raises(ValueError, match="adapter name"):
        peft.load_adapter(tmp_path, adapter_name=name)
    assert _module_names(peft) == before and list(peft.peft_config) == ["default"]


def test_save_pretrained_writes_only_inside_its_directory(tmp_path):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    peft.add_adapter("second-task_2", LoraConfig(r=2, target_modules=["c_attn"]))
    peft.save_pretrained(tmp_path / "out")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/adapter_config.json", "out/adapter_model.safetensors",
                       "out/second-task_2/adapter_config.json", "out/second-task_2/adapter_model.safetensors"]


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{abs}", "sub/../../outside.safetensors"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path, shard):
    """The file outside exists and holds the right tensors, so only the name check can stop the read."""
    folder = tmp_path / "model"
    model = tiny_gpt2()
    model.save_pretrained(folder)
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    tensors = {k: v.contiguous() for k, v in model.checkpoint_state_dict().items()}
    save_file(tensors, outside)
    index = {"weight_map": {k: shard.format(abs=outside) for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not a file name inside"):
        models.from_pretrained(folder)
