"""The contract of the fused path: in the configurations people train and serve with (LoRA dropout in
training, fp32 adapters on a bf16 model, torch.autocast, several active adapters, plain eval), every LoRA
layer's forward is exactly one kernels.lora_matmul call and never calls its base layer apart; on the
torch path and on the Triton kernels (interpreted). The numbers themselves are checked in
test_kernels_dropout_mixed.py, test_lora.py and tests/interop/."""
import contextlib

import pytest
import torch

from lowrank import LoraConfig, get_peft_model, kernels, models
from lowrank.lora import LoraLayer

from .helpers import tiny_gpt2, tiny_t5
from .kernel_checks import backend

CONFIGS = {
    "dropout-training": dict(dropout=0.1, train=True),
    "fp32-adapters-on-bf16": dict(model_dtype=torch.bfloat16),
    "fp32-adapters-on-bf16-dropout-training": dict(model_dtype=torch.bfloat16, dropout=0.1, train=True),
    "autocast-bf16-training": dict(autocast=True, dropout=0.1, train=True),
    "several-adapters-dropout-training": dict(adapters=2, dropout=0.1, train=True),
    "several-adapters-eval": dict(adapters=2),
    "eval": dict(),
}


def tiny_llama():
    torch.manual_seed(0)
    return models.LlamaForCausalLM(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2))


MODELS = {  # kind: (tiny model, LoRA targets): Llama's are all seven linears, gate/up/down the widest GEMMs
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "t5": (tiny_t5, ["q", "v", "wi"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def build(kind, model_dtype=torch.float32, dropout=0.0, adapters=1, **_):
    make, targets = MODELS[kind]
    model = make().to(model_dtype)
    config = lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                target_modules=targets)
    peft = get_peft_model(model, config())
    names = ["default"] + [f"extra{i}" for i in range(1, adapters)]
    for name in names[1:]:
        peft.add_adapter(name, config())
    peft.set_adapter(names)
    return peft


def batch(kind):
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, labels=ids) if kind != "t5" else dict(input_ids=ids, labels=ids[:, :5])


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("setting", list(CONFIGS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_every_lora_layer_forward_is_one_fused_call(kind, setting, backend_name, monkeypatch):
    options = CONFIGS[setting]
    peft = build(kind, **options)
    peft.train(options.get("train", False))
    layers = [m for m in peft.modules() if isinstance(m, LoraLayer)]
    assert layers and all(len(m.active_adapters) == options.get("adapters", 1) for m in layers)
    counts = {"layer": 0, "base": 0, "fused": 0, "unfused": 0}
    count = lambda key: lambda *_: counts.__setitem__(key, counts[key] + 1)
    for m in layers:
        m.register_forward_hook(count("layer"))
        m.base_layer.register_forward_hook(count("base"))
        for factor in (*m.lora_A.values(), *m.lora_B.values()):
            factor.register_forward_hook(count("unfused"))  # PEFT's way calls the factors as modules
    fused, ranks = kernels.lora_matmul, []
    monkeypatch.setattr(kernels, "lora_matmul", lambda *a, **k: (
        count("fused")(), ranks.append(a[2].shape[1]), fused(*a, **k))[-1])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if options.get("autocast") else contextlib.nullcontext()
    with backend(backend_name), autocast:
        out = peft(**batch(kind))
    out.loss.float().backward()
    assert counts["layer"] > 0 and counts["fused"] == counts["layer"], counts
    assert counts["base"] == counts["unfused"] == 0, counts
    assert set(ranks) == {4 * options.get("adapters", 1)}  # several adapters: one call of the summed rank
    grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)
