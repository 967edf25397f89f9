"""PeftModel on the tiny GPT-2 and T5: injection and freezing, exact base behaviour when LoRA is off or
zero, training that never moves a base weight, merging, many adapters, mixed batches, and adapter files
that load bit-exactly or not at all (docs/formats.md C)."""
import json
import re
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowrank import LoraConfig, LoraLayer, PeftModel, get_peft_model
from lowrank.lora import BASE

from .helpers import assert_close_rel, tiny_gpt2, tiny_t5



TINY = {"gpt2": tiny_gpt2, "t5": tiny_t5}
TARGETS = {"gpt2": [["c_attn"], ["c_attn", "c_proj", "c_fc"], r".*\.1\.mlp\.c_fc"],
           "t5": [["q", "v"], ["q", "k", "v", "o", "wi", "wo"], r".*decoder.*EncDecAttention\.(q|v)"]}
TO_SAVE = {"gpt2": ["ln_f"], "t5": ["final_layer_norm"]}


def batch(kind, rows=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (rows, 7), generator=g)
    return dict(input_ids=ids) if kind == "gpt2" else dict(input_ids=ids, decoder_input_ids=ids[:, :5])


def labeled_batch(kind):
    """Inputs with labels: the model computes the loss (T5 shifts the labels into decoder inputs)."""
    ids = batch(kind)["input_ids"]
    return dict(input_ids=ids, labels=ids if kind == "gpt2" else ids[:, :5])


def logits(model, kind, **kwargs):
    return model(**batch(kind), **kwargs).logits


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@st.composite
def setups(draw):
    """(model kind, LoraConfig) over targets, ranks, alphas, rsLoRA, patterns, bias modes, modules_to_save."""
    kind = draw(st.sampled_from(["gpt2", "t5"]))
    return kind, LoraConfig(
        r=draw(st.integers(1, 8)), lora_alpha=draw(st.sampled_from([1, 8, 16])), use_rslora=draw(st.booleans()),
        target_modules=draw(st.sampled_from(TARGETS[kind])), init_lora_weights=False,
        rank_pattern=draw(st.sampled_from([{}, {"c_fc": 2, "wo": 3}])),
        alpha_pattern=draw(st.sampled_from([{}, {r"h\.1\.attn\.c_attn": 32, "q": 5}])),
        bias=draw(st.sampled_from(["none", "lora_only", "all"])),
        modules_to_save=draw(st.sampled_from([None, TO_SAVE[kind]])),
    )


def test_names_and_state_dict_keys_are_peft_s():
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    names = [n for n, _ in peft.named_parameters()]
    for name in ["base_model.model.transformer.h.0.attn.c_attn.base_layer.weight",
                 "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight",
                 "base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight",
                 "base_model.model.transformer.ln_f.original_module.weight",
                 "base_model.model.transformer.ln_f.modules_to_save.default.bias"]:
        assert name in names
    assert peft.active_adapter == "default" and peft.active_adapters == ["default"]
    assert peft.config is peft.get_base_model().config and peft.prefill == peft.get_base_model().prefill


@given(setups())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_only_lora_selected_biases_and_module_copies_train(setup):
    kind, config = setup
    note(config)
    peft = get_peft_model(TINY[kind](), config)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A.default." in n or ".lora_B.default." in n}
    copies = {n for n in trainable if ".modules_to_save.default." in n}
    biases = trainable - lora - copies
    assert lora and all(n.endswith(".bias") or "bias" in n for n in biases)
    assert bool(copies) == bool(config.modules_to_save)
    if config.bias == "none":
        assert not biases
    if config.bias == "lora_only":
        assert all(n.endswith(".base_layer.bias") for n in biases)
    if config.bias == "all":
        frozen_biases = {n for n, p in peft.named_parameters() if "bias" in n and not p.requires_grad}
        assert all("original_module" in n for n in frozen_biases)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_zero_B_and_disabled_adapters_give_the_base_logits_exactly(kind):
    model = TINY[kind]()
    base = logits(model, kind)
    peft = get_peft_model(model, LoraConfig(target_modules=TARGETS[kind][1]))
    assert torch.equal(logits(peft, kind), base)
    peft.add_adapter("other", LoraConfig(target_modules=TARGETS[kind][0], init_lora_weights=False))
    peft.set_adapter("other")
    assert not torch.equal(logits(peft, kind), base)
    with peft.disable_adapter():
        assert torch.equal(logits(peft, kind), base)
        assert torch.equal(peft(**labeled_batch(kind)).loss, model(**labeled_batch(kind)).loss)
    assert not torch.equal(logits(peft, kind), base)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_training_moves_lora_and_copies_never_base_weights(kind):
    model = TINY[kind]().train()
    before = snapshot(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS[kind][1], modules_to_save=TO_SAVE[kind]))
    trained = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(peft.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = peft(**labeled_batch(kind)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in peft.named_parameters():
        if name not in trained:
            key = re.sub(r"\.(base_layer|original_module)\.", ".", name.removeprefix("base_model.model."))
            assert torch.equal(p, before[key]), name
    params = dict(peft.named_parameters())
    assert all(not torch.equal(params[n], trained[n]) for n in trained)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_merged_equals_unmerged_and_merge_and_unload_leaves_a_plain_model(kind):
    model = TINY[kind]()
    keys = model.state_dict().keys()
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS[kind][1], init_lora_weights=False))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=TARGETS[kind][0], init_lora_weights=False))
    peft.set_adapter(["default", "other"])
    unmerged = logits(peft, kind)
    peft.merge_adapter()
    assert_close_rel(logits(peft, kind), unmerged)
    with pytest.raises(ValueError, match="merged"):
        peft(**batch(kind), adapter_names=["default"] * 3)
    plain = peft.merge_and_unload()
    assert plain is model and not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert plain.state_dict().keys() == keys
    assert_close_rel(logits(plain, kind), unmerged)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_unload_gives_the_base_model_back_exactly(kind):
    model = TINY[kind]()
    base, before = logits(model, kind), snapshot(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS[kind][1], init_lora_weights=False,
                                            modules_to_save=TO_SAVE[kind]))
    assert peft.unload() is model
    assert_same_state(before, model)
    assert torch.equal(logits(model, kind), base)


@given(setups())
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_save_then_load_is_bit_exact(tmp_path_factory, setup):
    kind, config = setup
    note(config)
    peft = get_peft_model(TINY[kind](), config)
    with torch.no_grad():  # move every trainable bias and module copy off its base value
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(path)
    loaded = PeftModel.from_pretrained(TINY[kind](), path)
    saved = peft.adapter_tensors("default")
    back = loaded.adapter_tensors("default")
    assert saved.keys() == back.keys() == load_file(path / "adapter_model.safetensors").keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    assert torch.equal(logits(loaded, kind), logits(peft, kind))
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    assert loaded.peft_config["default"] == replace(peft.peft_config["default"], inference_mode=True)


def test_files_follow_peft_s_format(tmp_path):
    model = tiny_gpt2().to(torch.bfloat16)  # bf16 adapters too: the file still holds fp32
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], rank_pattern={"c_fc": 2}),
                          autocast_adapter_dtype=False)
    peft.add_adapter("second", LoraConfig(r=3, target_modules=["c_attn"]))
    peft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    p = "base_model.model.transformer.h.1."
    assert tensors[p + "attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert tensors[p + "attn.c_attn.lora_B.weight"].shape == (96, 4)
    assert tensors[p + "mlp.c_fc.lora_A.weight"].shape == (2, 32) and tensors[p + "mlp.c_fc.lora_B.weight"].shape == (128, 2)
    assert tensors[p + "mlp.c_proj.lora_A.weight"].shape == (4, 128)
    assert len(tensors) == 16 and all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["fan_in_fan_out"] is True and config["peft_type"] == "LORA"
    assert len(load_file(tmp_path / "second" / "adapter_model.safetensors")) == 4
    assert not list(tmp_path.rglob("*.tmp"))
    loaded = PeftModel.from_pretrained(tiny_gpt2().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.adapter_tensors("default").values(),
                                                  peft.adapter_tensors("default").values()))


def _corrupt(kind, path, tmp_path):
    """Damage a saved GPT-2 adapter at `path` in one way; returns what the error must mention."""
    weights, config_file = path / "adapter_model.safetensors", path / "adapter_config.json"
    tensors, key = load_file(weights), "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
    if kind == "shape":
        tensors[key] = torch.zeros(4, 31)
    elif kind == "missing":
        del tensors[key]
    elif kind == "unexpected":
        tensors["base_model.model.transformer.h.0.attn.c_proj.lora_A.weight"] = torch.zeros(4, 32)
        key = "c_proj"
    elif kind == "pickle":
        torch.save(tensors, path / "adapter_model.bin")
        weights.unlink()
        return "adapter_model.bin"
    else:
        config = json.loads(config_file.read_text())
        config.update({"t5": {"target_modules": ["q", "v"]}, "r": {"r": 0}, "dora": {"use_dora": True}}[kind])
        config_file.write_text(json.dumps(config))
        return {"t5": r"adapter_config.json.*\['q', 'v'\]", "r": "adapter_config.json.*r=0", "dora": "use_dora"}[kind]
    save_file(tensors, weights)
    return rf"adapter_model.safetensors.*{re.escape(key)}"


@pytest.mark.parametrize("kind", ["shape", "missing", "unexpected", "pickle", "t5", "r", "dora"])
def test_a_bad_adapter_is_refused_before_the_model_changes(tmp_path, kind):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    peft.save_pretrained(tmp_path)
    message = _corrupt(kind, tmp_path, tmp_path)
    plain = tiny_gpt2()
    before = snapshot(plain)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(plain, tmp_path)
    assert_same_state(before, plain)
    before = snapshot(peft)
    with pytest.raises(ValueError, match=message):
        peft.load_adapter(tmp_path, "again")
    assert_same_state(before, peft)
    assert list(peft.peft_config) == ["default"]


def test_shape_errors_name_the_expected_and_found_shapes(tmp_path):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    peft.save_pretrained(tmp_path)
    _corrupt("shape", tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"has shape \(4, 31\), expected \(4, 32\)"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_many_adapters_switch_sum_and_delete():
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    peft.add_adapter("b", LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    assert peft.active_adapter == "default"
    assert not any(p.requires_grad for n, p in peft.named_parameters() if ".b." in n)
    only_default = logits(peft, "gpt2")
    peft.set_adapter("b")
    only_b = logits(peft, "gpt2")
    assert all(p.requires_grad for n, p in peft.named_parameters() if ".b.weight" in n)
    assert not any(p.requires_grad for n, p in peft.named_parameters() if ".default." in n)
    peft.set_adapter(["default", "b"])
    both = logits(peft, "gpt2")
    assert not torch.equal(both, only_default) and not torch.equal(both, only_b)
    peft.delete_adapter("b")
    assert list(peft.peft_config) == ["default"] and peft.active_adapters == ["default"]
    assert torch.equal(logits(peft, "gpt2"), only_default)
    with pytest.raises(ValueError, match="unknown adapters"):
        peft.set_adapter("b")


def _two_adapter_model(kind):
    peft = get_peft_model(TINY[kind](), LoraConfig(r=4, target_modules=TARGETS[kind][1], init_lora_weights=False,
                                                    modules_to_save=TO_SAVE[kind]))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=TARGETS[kind][0], init_lora_weights=False))
    with torch.no_grad():  # the module copies start equal to the original: move them
        for name, p in peft.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.1 * torch.randn_like(p))
    return peft


def _alone(peft, name):
    """Context in which the model runs adapter `name` alone (or the base for BASE)."""
    if name == BASE:
        return peft.disable_adapter()
    peft.set_adapter(name)
    return torch.no_grad()


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_mixed_batch_rows_equal_each_row_alone(kind):
    peft = _two_adapter_model(kind)
    names = ["other", BASE, "default", "other"]
    inputs = batch(kind, rows=4)
    mixed = peft(**inputs, adapter_names=names).logits
    for i, name in enumerate(names):
        with _alone(peft, name):
            alone = peft(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
        assert_close_rel(mixed[i], alone[0])
    with pytest.raises(ValueError, match="unknown adapters"):
        peft(**inputs, adapter_names=["nope"] * 4)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_mixed_batch_generation_keeps_each_row_s_adapter(kind):
    peft = _two_adapter_model(kind)
    names = ["default", BASE, "other"]
    ids = batch(kind)["input_ids"]
    mixed = peft.generate(ids, max_new_tokens=6, adapter_names=names)
    for i, name in enumerate(names):
        with _alone(peft, name):
            assert torch.equal(peft.generate(ids[i : i + 1], max_new_tokens=6)[0], mixed[i])


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_weighted_adapter_is_the_weighted_sum_of_deltas(combination_type):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"],
                                                  init_lora_weights=False))
    peft.add_adapter("b", LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["c_attn"], init_lora_weights=False))
    weights = [0.7, -1.3]
    peft.add_weighted_adapter(["default", "b"], weights, "mix", combination_type, svd_rank=5)
    assert peft.peft_config["mix"].r == 5 and peft.peft_config["mix"].lora_alpha == 5
    layers = [m for m in peft.modules() if isinstance(m, LoraLayer)]
    assert all("mix" in m.lora_A and m.scaling["mix"] == 1.0 for m in layers)
    for m in layers:
        want = sum(w * m.get_delta_weight(n).double() for n, w in zip(["default", "b"], weights) if n in m.lora_A)
        assert_close_rel(m.get_delta_weight("mix").double(), want)
    with pytest.raises(ValueError, match="equal ranks"):
        peft.add_weighted_adapter(["default", "b"], weights, "lin", "linear")


@pytest.mark.parametrize("kwargs, message", [
    (dict(svd_rank=0), "svd_rank=0 must be None"), (dict(svd_rank=2.0), "svd_rank=2.0"),
    (dict(weights=[float("nan")]), r"weights=\[nan\] must be finite numbers"), (dict(weights=["1"]), "weights"),
    (dict(adapter_name="a.b"), "adapter name 'a.b'"),
])
def test_weighted_adapter_refuses_bad_arguments_before_the_model_changes(kwargs, message):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=3, target_modules=["c_attn"]))
    before = snapshot(peft)
    with pytest.raises(ValueError, match=message):
        peft.add_weighted_adapter(**{"adapters": ["default"], "weights": [1.0], "adapter_name": "w", **kwargs})
    assert_same_state(before, peft)
    assert list(peft.peft_config) == ["default"]


def test_bf16_model_keeps_fp32_adapters_unless_asked():
    model = tiny_gpt2().to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    layer = peft.get_base_model().transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.dtype == torch.float32 and logits(peft, "gpt2").dtype == torch.bfloat16
    fused = get_peft_model(tiny_gpt2().to(torch.bfloat16), LoraConfig(r=4, init_lora_weights=False),
                           autocast_adapter_dtype=False)
    layer = fused.get_base_model().transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    unmerged = logits(fused, "gpt2")
    fused.merge_adapter()
    assert_close_rel(logits(fused, "gpt2"), unmerged, torch.bfloat16)


def test_print_trainable_parameters_uses_peft_s_line(capsys):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"))
    peft.print_trainable_parameters()
    trainable, total = peft.get_nb_trainable_parameters()
    assert (trainable, total) == (704, 30080)  # peft 0.21.2 on transformers' same-shaped GPT-2 prints these
    assert capsys.readouterr().out == "trainable params: 704 || all params: 30,080 || trainable%: 2.3404\n"


def test_a_layer_that_fails_to_build_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_gpt2()
    names, before = [n for n, _ in model.named_modules()], snapshot(model)
    calls = []

    def fails_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("can't allocate memory")
        return original(self, *args, **kwargs)
    original = LoraLayer.update_layer
    monkeypatch.setattr(LoraLayer, "update_layer", fails_second)
    with pytest.raises(ValueError, match="could not be built .*nothing was added"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    assert [n for n, _ in model.named_modules()] == names
    assert_same_state(before, model)


@pytest.mark.parametrize("call, error, message", [
    (lambda m: get_peft_model(m, {"r": 8}), TypeError, "peft_config must be a PeftConfig instance"),
    (lambda m: get_peft_model(None, LoraConfig()), TypeError, "model must be a torch.nn.Module"),
    (lambda m: get_peft_model(get_peft_model(m, LoraConfig(r=2, target_modules=["c_attn"])).get_base_model(),
                              LoraConfig(r=4, target_modules=["c_attn"])), ValueError, "already holds adapter layers"),
    (lambda m: get_peft_model(m, LoraConfig(r=2, target_modules=["c_attn"])).set_adapter([]), ValueError,
     "non-empty list"),
    (lambda m: get_peft_model(m, LoraConfig(r=2, target_modules=["c_attn"])).add_adapter(
        "b", LoraConfig(target_modules=["c_proj"], modules_to_save=["c_attn"])), ValueError, "hold LoRA layers"),
    (lambda m: get_peft_model(m, LoraConfig(r=2, target_modules=["c_attn"]))(
        input_ids=torch.tensor([[1]]), adapter_names=[["default"]]), ValueError, "adapter_names="),
])
def test_bad_api_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_gpt2())
