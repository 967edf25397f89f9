"""Hotswap against peft 0.21: adapters peft saves, of other ranks and alphas, swapped into our prepared
model give the logits of peft's model loaded with that adapter, and of peft's own prepare + hotswap_adapter.

Not with rank_pattern: peft's hotswap matches the patterns against whole parameter keys
("....c_fc.lora_A.default.weight", anchored at the end), finds none, and scales with config.r (its logits
then differ from its own fresh load by 0.24 here); ours meets peft's fresh load there too."""
import pytest
import torch

import lowrank
from lowrank import models

from ..helpers import assert_close_rel
from .test_lora_peft import TASK, auto_class, hf_model, inputs

peft = pytest.importorskip("peft")
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

ADAPTERS = {  # peft.LoraConfig fields; the first is loaded, the others swapped in
    "gpt2": [dict(r=2, lora_alpha=16, target_modules=["c_attn", "c_fc"]),
             dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
             dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 1})],
    "llama": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
              dict(r=1, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"])],
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_peft_adapters_hotswapped_here_give_peft_s_logits(kind, tmp_path):
    hf_model(kind).save_pretrained(tmp_path / "base")
    folders = []
    for i, fields in enumerate(ADAPTERS[kind]):
        torch.manual_seed(i)
        config = peft.LoraConfig(**fields, task_type=TASK.get(kind, "CAUSAL_LM"), init_lora_weights=False)
        peft.get_peft_model(auto_class(kind).from_pretrained(tmp_path / "base"), config).save_pretrained(tmp_path / str(i))
        folders.append(tmp_path / str(i))
    rank = max(max([f["r"], *f.get("rank_pattern", {}).values()]) for f in ADAPTERS[kind])
    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), folders[0])
    lowrank.prepare_model_for_compiled_hotswap(ours, target_rank=rank)
    theirs_swapped = peft.PeftModel.from_pretrained(auto_class(kind).from_pretrained(tmp_path / "base").eval(), folders[0])
    prepare_model_for_compiled_hotswap(theirs_swapped, target_rank=rank)
    for fields, folder in zip(ADAPTERS[kind][1:] + ADAPTERS[kind][:1], folders[1:] + folders[:1]):
        lowrank.hotswap_adapter(ours, folder, "default")
        hotswap_adapter(theirs_swapped, folder, "default", torch_device="cpu")
        theirs = peft.PeftModel.from_pretrained(auto_class(kind).from_pretrained(tmp_path / "base").eval(), folder)
        with torch.no_grad():
            logits = ours(**inputs(kind)).logits
            assert_close_rel(logits, theirs(**inputs(kind)).logits, rtol=1e-4)
            if "rank_pattern" not in fields:  # peft's hotswap misses the patterns (see the module docstring)
                assert_close_rel(logits, theirs_swapped(**inputs(kind)).logits, rtol=1e-4)
