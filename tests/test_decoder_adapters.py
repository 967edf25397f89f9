"""LoRA on the decoders that came after GPT-2 (GPT-Neo, BLOOM, Llama/Qwen2/Mistral): a mixed-adapter batch
equals each row run with its own adapter, KV-cache generation keeps each row's adapter, merge_and_unload
equals the unmerged model and unload gives the base back. (peft agreement: tests/interop/test_lora_peft.py.)"""
import pytest
import torch

from lowrank import LoraConfig, get_peft_model, models

from .helpers import assert_close_rel

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
DECODERS = {  # kind: (model, LoRA targets)
    "gpt_neo": (lambda: models.GPTNeoForCausalLM(models.GPTNeoConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=3, max_position_embeddings=64)), ["q_proj", "v_proj", "out_proj", "c_fc", "c_proj"]),
    "bloom": (lambda: models.BloomForCausalLM(models.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
              ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "llama": (lambda: models.LlamaForCausalLM(models.LlamaConfig(**LLAMA)), SEVEN),
    "qwen2": (lambda: models.Qwen2ForCausalLM(models.Qwen2Config(**LLAMA)), SEVEN),
    "mistral": (lambda: models.MistralForCausalLM(models.MistralConfig(**LLAMA, sliding_window=3)), SEVEN),
}


def two_adapters(kind):
    make, targets = DECODERS[kind]
    torch.manual_seed(0)
    peft = get_peft_model(make().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    return peft.eval()


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_a_mixed_adapter_batch_equals_each_row_with_its_adapter(kind):
    peft = two_adapters(kind)
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        mixed = peft(ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with peft.disable_adapter():
                    alone = peft(ids[row:row + 1]).logits
            else:
                peft.set_adapter(name)
                alone = peft(ids[row:row + 1]).logits
            assert_close_rel(mixed[row:row + 1], alone)
        generated = peft.generate(ids, adapter_names=names, max_new_tokens=6, eos_token_id=None)
        for row, name in enumerate(names[::2]):
            peft.set_adapter(name)
            assert torch.equal(generated[2 * row:2 * row + 1],
                               peft.generate(ids[2 * row:2 * row + 1], max_new_tokens=6, eos_token_id=None))


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_merge_and_unload_equal_the_adapted_and_the_base_model(kind):
    peft = two_adapters(kind)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = peft(ids).logits
        with peft.disable_adapter():
            base = peft(ids).logits
        assert not torch.allclose(adapted, base)
        merged = two_adapters(kind).merge_and_unload()
        assert_close_rel(merged(ids).logits, adapted, rtol=1e-5)
        assert_close_rel(peft.unload()(ids).logits, base)
