"""Adapter hotswap (lowrank.hotswap): a swapped-in adapter gives what a fresh load of it gives (bit for bit
where the math is the same), a compiled model swaps without compiling a new graph, saving after a swap
writes the new adapter's file, and every refused swap names its cause and leaves the model as it was."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from lowrank import (LoraConfig, PeftModel, PromptTuningConfig, get_peft_model, hotswap_adapter,
                     prepare_model_for_compiled_hotswap)
from lowrank.lora import LoraLayer

from .helpers import assert_close_rel, tiny_gpt2, tiny_t5

TINY = {"gpt2": tiny_gpt2, "t5": tiny_t5}
TARGETS = {"gpt2": ["c_attn", "c_fc"], "t5": ["q", "v", "wo"]}
ADAPTERS = {  # LoraConfig fields of the adapters swapped in and out, all on TARGETS unless they say otherwise
    "r4": dict(r=4, lora_alpha=8),
    "r2-alpha16": dict(r=2, lora_alpha=16),
    "r2-alpha4": dict(r=2, lora_alpha=4),  # r4's scaling, 2
    "r3-rslora": dict(r=3, lora_alpha=5, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"c_fc": 1, "wo": 1}, alpha_pattern={"c_attn": 3, "q": 3}),
    "r8": dict(r=8, lora_alpha=8),
    "fewer-modules": dict(r=4, lora_alpha=8, targets=1),
    "dropout": dict(r=4, lora_alpha=8, lora_dropout=0.1),
    "copies-r4": dict(r=4, lora_alpha=8, bias="lora_only", modules_to_save=["ln_f"]),
    "copies-r2": dict(r=2, lora_alpha=16, bias="lora_only", modules_to_save=["ln_f"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(kind, adapter): folder} of every adapter in ADAPTERS (those with module copies: GPT-2's only), saved
    from the tiny models with random factors, biases and copies."""
    folders = {}
    for kind in TINY:
        for seed, (name, fields) in enumerate(ADAPTERS.items()):
            fields = dict(fields)
            targets = TARGETS[kind][:fields.pop("targets", None)]
            torch.manual_seed(seed)
            if "modules_to_save" in fields and kind == "t5":
                continue
            model = get_peft_model(TINY[kind](), LoraConfig(**fields, target_modules=targets, init_lora_weights=False))
            with torch.no_grad():  # biases and module copies off their base values, so that the files differ
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.1 * torch.randn_like(p))
            folders[kind, name] = tmp_path_factory.mktemp(f"{kind}-{name}")
            model.save_pretrained(folders[kind, name])
    return folders


def batch(kind):
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids) if kind == "gpt2" else dict(input_ids=ids, decoder_input_ids=ids[:, :5])


@torch.no_grad()
def logits(model, kind):
    return model(**batch(kind)).logits


def loaded(saved, kind, adapter, dtype=torch.float32, target_rank=None):
    """A fresh model with `adapter` loaded as "default"; prepared for hotswaps when target_rank is given."""
    model = PeftModel.from_pretrained(TINY[kind]().to(dtype), saved[kind, adapter])
    if target_rank is not None:
        prepare_model_for_compiled_hotswap(model, target_rank=target_rank)
    return model


def state(model):
    """Everything a refused swap must leave as it was: parameters, scalings, ranks, configs."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [({n: float(s) for n, s in m.scaling.items()}, dict(m.r), dict(m.lora_alpha)) for m in layers],
            dict(model.peft_config))


def assert_same_state(before, after):
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new", ["r2-alpha16", "r3-rslora", "patterns", "r4"])
def test_a_hotswapped_adapter_gives_a_fresh_load_s_logits(saved, kind, dtype, new):
    model = loaded(saved, kind, "r4", dtype, target_rank=4)
    hotswap_adapter(model, saved[kind, new], "default")
    assert_close_rel(logits(model, kind), logits(loaded(saved, kind, new, dtype), kind), dtype)
    # a fresh load prepared the same way runs the same math: the same bits
    assert torch.equal(logits(model, kind), logits(loaded(saved, kind, new, dtype, target_rank=4), kind))


def test_a_hotswap_replaces_biases_and_module_copies_too(saved):
    model = loaded(saved, "gpt2", "copies-r4", target_rank=4)
    hotswap_adapter(model, saved["gpt2", "copies-r2"], "default")
    assert torch.equal(logits(model, "gpt2"), logits(loaded(saved, "gpt2", "copies-r2", target_rank=4), "gpt2"))


def test_preparing_pads_with_exact_zeros_and_keeps_the_logits(saved):
    plain, model = loaded(saved, "gpt2", "r2-alpha16"), loaded(saved, "gpt2", "r2-alpha16")
    config = LoraConfig(r=2, rank_pattern={"c_fc": 1})
    prepare_model_for_compiled_hotswap(model, target_rank=6, config=config)
    for m, p in zip(model.modules(), plain.modules()):
        if isinstance(m, LoraLayer):
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            assert A.shape[0] == B.shape[1] == 6 and m.r["default"] == 2
            assert torch.equal(A[:2], p.lora_A["default"].weight) and not A[2:].any()
            assert torch.equal(B[:, :2], p.lora_B["default"].weight) and not B[:, 2:].any()
            assert isinstance(m.scaling["default"], torch.Tensor) and m.scaling["default"].item() == p.scaling["default"]
    assert config.r == 6 and config.rank_pattern == {"c_fc": 6}  # PEFT's edit of the configs passed
    assert_close_rel(logits(model, "gpt2"), logits(plain, "gpt2"))
    model.merge_adapter()  # get_delta_weight with a tensor scaling
    plain.merge_adapter()
    assert_close_rel(logits(model, "gpt2"), logits(plain, "gpt2"))


def test_saving_after_a_hotswap_writes_the_new_adapter_s_file(saved, tmp_path):
    model = loaded(saved, "gpt2", "r4", target_rank=4)
    hotswap_adapter(model, saved["gpt2", "patterns"], "default")
    model.save_pretrained(tmp_path)
    ours, theirs = load_file(tmp_path / "adapter_model.safetensors"), load_file(saved["gpt2", "patterns"] / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == json.loads((saved["gpt2", "patterns"] / "adapter_config.json").read_text())


def test_a_lower_rank_with_the_same_scaling_swaps_without_preparing(saved):
    model = loaded(saved, "gpt2", "r4")
    model.load_adapter(saved["gpt2", "r2-alpha4"], "default", hotswap=True)
    assert_close_rel(logits(model, "gpt2"), logits(loaded(saved, "gpt2", "r2-alpha4"), "gpt2"))


def test_set_scale_writes_a_prepared_scaling_in_place(saved):
    model, plain = loaded(saved, "gpt2", "r4", target_rank=4), loaded(saved, "gpt2", "r4")
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    scaling = layer.scaling["default"]
    for m in [*model.modules(), *plain.modules()]:
        if isinstance(m, LoraLayer):
            m.set_scale("default", 0.5)
    assert layer.scaling["default"] is scaling and scaling.item() == 0.5 * 8 / 4
    assert_close_rel(logits(model, "gpt2"), logits(plain, "gpt2"))


def test_a_mixed_batch_reads_a_prepared_scaling_after_set_scale(saved):
    model = loaded(saved, "gpt2", "r4", target_rank=4)
    model.load_adapter(saved["gpt2", "r2-alpha16"], "other")
    mixed = lambda: model(**batch("gpt2"), adapter_names=["default", "other"]).logits  # noqa: E731
    mixed()  # caches the adapters' stacks
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", 0.5)
    assert_close_rel(mixed()[0], logits(model, "gpt2")[0])


def compiled(model, backend="aot_eager"):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=backend, fullgraph=True)


@pytest.mark.slow
def test_a_compiled_model_swaps_adapters_without_a_new_graph(saved):
    model = loaded(saved, "gpt2", "r2-alpha16", target_rank=4)
    fast = compiled(model)
    assert_close_rel(logits(fast, "gpt2"), logits(loaded(saved, "gpt2", "r2-alpha16"), "gpt2"))
    graphs = unique_graphs()
    for new in ["r4", "r3-rslora", "patterns", "r2-alpha16"]:
        hotswap_adapter(fast, saved["gpt2", new], "default")
        assert_close_rel(logits(fast, "gpt2"), logits(loaded(saved, "gpt2", new), "gpt2"))
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", 0.5)
    logits(fast, "gpt2")
    assert unique_graphs() == graphs


@pytest.mark.slow
def test_a_compiled_mixed_batch_swaps_without_a_new_graph(saved):
    model = loaded(saved, "gpt2", "r2-alpha16", target_rank=4)
    model.load_adapter(saved["gpt2", "r3-rslora"], "other")
    prepare_model_for_compiled_hotswap(model, check_compiled="ignore")  # "other"'s scaling too
    fast, rows = compiled(model), ["other", "default"]
    with torch.no_grad():
        fast(**batch("gpt2"), adapter_names=rows)
        graphs = unique_graphs()
        hotswap_adapter(fast, saved["gpt2", "r4"], "default")
        mixed = fast(**batch("gpt2"), adapter_names=rows).logits
    assert_close_rel(mixed[1], logits(loaded(saved, "gpt2", "r4"), "gpt2")[1])
    assert_close_rel(mixed[0], logits(loaded(saved, "gpt2", "r3-rslora"), "gpt2")[0])
    assert unique_graphs() == graphs


@pytest.mark.slow
def test_an_unprepared_compiled_model_recompiles_for_a_new_scaling(saved):
    """Why preparing is needed: a Python float scaling is baked into the graph (and this test's counter sees it)."""
    model = loaded(saved, "gpt2", "r4")
    fast = compiled(model)
    logits(fast, "gpt2")
    graphs = unique_graphs()
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", 0.5)
    logits(fast, "gpt2")
    assert unique_graphs() > graphs


@pytest.mark.slow
def test_inductor_reads_the_swapped_scaling_and_factors(saved):
    """Inductor compiles its own kernels around the layer; a swap must reach them without a new graph."""
    fast = compiled(loaded(saved, "gpt2", "r4", target_rank=4), backend="inductor")
    logits(fast, "gpt2")
    graphs = unique_graphs()
    hotswap_adapter(fast, saved["gpt2", "r2-alpha16"], "default")
    assert_close_rel(logits(fast, "gpt2"), logits(loaded(saved, "gpt2", "r2-alpha16"), "gpt2"))
    assert unique_graphs() == graphs


@pytest.mark.parametrize("new, prepared, message", [
    ("r8", True, r"transformer\.h\.0\.attn\.c_attn has rank 8 in the new adapter, above the loaded one's 4"),
    ("fewer-modules", True, r"holds other modules.*h\.0\.mlp\.c_fc\.lora_A"),
    ("r2-alpha16", False, r"scaling 8\.0 in the new adapter and 2\.0 in the loaded one.*prepare_model_for_compiled_hotswap"),
    ("dropout", True, r"lora_dropout is 0\.1 in the new adapter and 0\.0"),
])
def test_a_swap_that_cannot_be_done_in_place_is_refused_before_the_model_changes(saved, new, prepared, message):
    model = loaded(saved, "gpt2", "r4", target_rank=4 if prepared else None)
    before = state(model)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(saved["gpt2", new], "default", hotswap=True)
    assert_same_state(before, state(model))


def test_a_swap_into_a_missing_or_merged_adapter_or_a_soft_prompt_is_refused(saved):
    model = loaded(saved, "gpt2", "r4", target_rank=4)
    before = state(model)
    with pytest.raises(ValueError, match=r"unknown adapters \['other'\]"):
        model.load_adapter(saved["gpt2", "r4"], "other", hotswap=True)
    with pytest.raises(ValueError, match=r"cannot hotswap into adapter 'other'"):
        hotswap_adapter(model, saved["gpt2", "r4"], "other")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the weights; call unmerge_adapter"):
        hotswap_adapter(model, saved["gpt2", "r2-alpha16"], "default")
    model.unmerge_adapter()
    assert_close_rel(logits(model, "gpt2"), logits(loaded(saved, "gpt2", "r4"), "gpt2"))
    assert before[1:] == state(model)[1:]
    prompt = get_peft_model(tiny_gpt2(), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="hotswap replaces LoRA adapters"):
        hotswap_adapter(prompt, saved["gpt2", "r4"], "default")
    with pytest.raises(ValueError, match="no LoRA layers"):
        prepare_model_for_compiled_hotswap(prompt)


def test_preparing_refuses_a_low_target_rank_a_compiled_model_and_bad_arguments(saved):
    model = loaded(saved, "gpt2", "r4")
    before = state(model)
    with pytest.raises(ValueError, match=r"target_rank=2 is below the rank of base_model\.model\.transformer\.h\.0\.attn\.c_attn "
                                         r"\(adapter 'default', rank 4\)"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    for bad in [dict(target_rank=0), dict(target_rank=2.0), dict(check_compiled="never")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            prepare_model_for_compiled_hotswap(model, **bad)
    with pytest.raises(ValueError, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=4)
    assert_same_state(before, state(model))
    with pytest.warns(UserWarning, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=4, check_compiled="warn")
