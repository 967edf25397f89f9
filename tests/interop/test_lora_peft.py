"""Interop with peft 0.21 on transformers' tiny random GPT-2, T5, GPT-Neo, BLOOM, Llama, Qwen2 and Mistral: an adapter peft saves loads here with
the same logits, one saved here loads in peft with the same logits, adapter_config.json survives both
ways, and the trainable-parameter counts agree (docs/formats.md C).

modules_to_save is exercised on the final layer norms (GPT-2 `ln_f`, T5 `final_layer_norm`): peft
supports any module there, and the norms avoid the lm_head/embedding tying that makes `lm_head` awkward.
"""
import json
import warnings

import pytest
import torch

import lowrank
from lowrank import models

from ..helpers import assert_close_rel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

CASES = {
    "gpt2-three-targets": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-rank-alpha-patterns": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2},
                                              alpha_pattern={r"h.1.attn.c_attn": 32})),
    "gpt2-rslora-bias-ln_f": ("gpt2", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn"],
                                           bias="lora_only", modules_to_save=["ln_f"])),
    "gpt2-layer-1-only": ("gpt2", dict(r=3, target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h")),
    "t5-default-targets": ("t5", dict(r=4)),
    "t5-all-patterns-rslora": ("t5", dict(r=2, use_rslora=True, lora_alpha=6, target_modules=["q", "k", "v", "o", "wi", "wo"],
                                          rank_pattern={"wo": 3}, alpha_pattern={"q": 5})),
    "t5-regex-final-norms": ("t5", dict(r=4, target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(q|v)",
                                        modules_to_save=["final_layer_norm"])),
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES.update({
    "gpt_neo-default-targets": ("gpt_neo", dict(r=4)),
    "gpt_neo-mlp-ln_f": ("gpt_neo", dict(r=2, target_modules=["q_proj", "out_proj", "c_fc", "c_proj"],
                                         modules_to_save=["ln_f"])),
    "bloom-default-targets": ("bloom", dict(r=4)),
    "bloom-mlp-bias": ("bloom", dict(r=3, target_modules=["query_key_value", "dense_h_to_4h", "dense_4h_to_h"],
                                     bias="lora_only")),
    "llama-gqa-all-seven": ("llama", dict(r=4, lora_alpha=8, target_modules=SEVEN)),
    "qwen2-bias-all-linear": ("qwen2", dict(r=2, target_modules="all-linear", rank_pattern={"down_proj": 3})),
    "mistral-window-seven-norm": ("mistral", dict(r=4, target_modules=SEVEN, modules_to_save=["norm"])),
})
TASK = {"gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}  # the rest: CAUSAL_LM
DECODERS = {  # transformers config kwargs of tiny random decoders (no dropout: logits are compared)
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64),
    "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=64, max_position_embeddings=64,
                    attention_types=[[["global", "local"], 1]], window_size=4),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=64),
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64),
    "mistral": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, vocab_size=64, sliding_window=4),
}


def auto_class(kind):
    return transformers.AutoModelForSeq2SeqLM if kind == "t5" else transformers.AutoModelForCausalLM


def hf_model(kind):
    torch.manual_seed(0)
    if kind != "t5":
        config = transformers.AutoConfig.for_model(kind, **DECODERS[kind], bos_token_id=0, eos_token_id=0)
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def inputs(kind):
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    return dict(input_ids=ids) if kind != "t5" else dict(input_ids=ids, decoder_input_ids=ids[:, :6])


@torch.no_grad()
def perturb_non_lora(model):
    """Move trainable biases and module copies off their base values, so that files must carry them."""
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    """(kind, LoraConfig kwargs, folder with transformers' base checkpoint)."""
    kind, kwargs = CASES[request.param]
    hf_model(kind).save_pretrained(tmp_path / "base")
    return kind, dict(kwargs, task_type=TASK.get(kind, "CAUSAL_LM"), init_lora_weights=False), tmp_path


def test_peft_adapter_loads_here_with_the_same_logits(case):
    kind, kwargs, tmp = case
    hf = auto_class(kind)
    theirs = peft.get_peft_model(hf.from_pretrained(tmp / "base").eval(), peft.LoraConfig(**kwargs))
    perturb_non_lora(theirs)
    theirs.save_pretrained(tmp / "adapter")
    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(tmp / "base"), tmp / "adapter")
    with torch.no_grad():
        assert_close_rel(ours(**inputs(kind)).logits, theirs(**inputs(kind)).logits, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key peft writes is known here
        saved = lowrank.config_from_dict(json.loads((tmp / "adapter" / "adapter_config.json").read_text()))
    theirs_config = theirs.peft_config["default"]
    for field in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
                  "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "task_type"):
        assert getattr(saved, field) == getattr(theirs_config, field), field
    targets = theirs_config.target_modules  # peft keeps a list as a set
    assert saved.target_modules == targets if isinstance(targets, str) else set(saved.target_modules) == targets


def test_adapter_saved_here_loads_in_peft_with_the_same_logits(case):
    kind, kwargs, tmp = case
    ours = lowrank.get_peft_model(models.from_pretrained(tmp / "base"), lowrank.LoraConfig(**kwargs))
    perturb_non_lora(ours)
    ours.save_pretrained(tmp / "adapter")
    hf = auto_class(kind)
    theirs = peft.PeftModel.from_pretrained(hf.from_pretrained(tmp / "base").eval(), tmp / "adapter")
    with torch.no_grad():
        assert_close_rel(theirs(**inputs(kind)).logits, ours(**inputs(kind)).logits, rtol=1e-4)
    loaded = peft.LoraConfig.from_pretrained(tmp / "adapter")
    ours_config = ours.peft_config["default"]
    for field in ("r", "lora_alpha", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "rank_pattern",
                  "alpha_pattern", "layers_to_transform", "layers_pattern", "task_type"):
        assert getattr(loaded, field) == getattr(ours_config, field), field
    assert loaded.inference_mode is True


def test_trainable_parameter_counts_match_peft(case):
    kind, kwargs, tmp = case
    hf = auto_class(kind)
    theirs = peft.get_peft_model(hf.from_pretrained(tmp / "base"), peft.LoraConfig(**kwargs))
    ours = lowrank.get_peft_model(models.from_pretrained(tmp / "base"), lowrank.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("gpt2")])
def test_loss_and_adapter_gradients_under_cpu_bf16_autocast_are_as_close_to_fp32_as_peft(name, tmp_path):
    """One backward of the same adapter under torch.autocast("cpu", bfloat16): our fused call (x and W in
    bf16, fp32 adapters) against peft's unfused bf16/fp32 mix. peft in fp32 is the reference; our bf16
    error must be within twice peft's bf16 error plus bf16's tolerance (the flash-attention rule).
    T5 is left out: transformers' own T5 forward fails under CPU bf16 autocast (a view error in 5.24)."""
    kind, kwargs = CASES[name]
    hf_model(kind).save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(),
                                 peft.LoraConfig(**kwargs, task_type=TASK.get(kind, "CAUSAL_LM"), init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "adapter",
                                             is_trainable=True).eval()
    batch = dict(inputs(kind), labels=inputs(kind)["input_ids"])

    def loss_and_grads(model, bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    (ref_loss, ref), (peft_loss, peft_bf16), (our_loss, ours_bf16) = (
        loss_and_grads(theirs, False), loss_and_grads(theirs, True), loss_and_grads(ours, True))
    assert abs(our_loss - ref_loss) <= 2 * abs(peft_loss - ref_loss) + 1e-2 * abs(ref_loss)
    assert ours_bf16.keys() == ref.keys() and ref
    for n, g in ours_bf16.items():
        assert g.dtype == torch.float32
        scale = ref[n].abs().max().item()
        err, peft_err = (g - ref[n]).abs().max().item(), (peft_bf16[n] - ref[n]).abs().max().item()
        assert err <= 2 * peft_err + 1e-2 * scale, f"{n}: {err:.2e} vs peft's {peft_err:.2e} (max |g| {scale:.2e})"
