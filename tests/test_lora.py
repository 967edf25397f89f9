"""The LoRA layer as a specification: y = x @ W + s * (x @ A) @ B + bias for nn.Linear and Conv1D bases,
merge and unmerge as inverses, the disabled and B = 0 cases exactly the base, mixed batches row by row,
and the weighted combinations of adapters (docs/formats.md C.3)."""
import math

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn

from lowrank import kernels
from lowrank import LoraConfig, get_peft_model
from lowrank.lora import BASE, LoraLayer, combine_adapters, mixed_batch_forward
from lowrank.models.gpt2 import Conv1D

from .helpers import assert_close_rel, tiny_gpt2
from .kernel_checks import backend

DTYPES = [torch.float32, torch.bfloat16]


@st.composite
def layer_cases(draw):
    return dict(
        kind=draw(st.sampled_from(["linear", "conv1d"])),
        K=draw(st.integers(1, 48)), N=draw(st.integers(1, 48)), r=draw(st.integers(1, 16)),
        alpha=draw(st.sampled_from([1, 8, 16, 32.5])), rslora=draw(st.booleans()),
        bias=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
        B=draw(st.integers(1, 5)), T=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_layer(c, adapters=("a",), init=False):
    """A LoraLayer over a random base (frozen) with the given adapters, all active, in c["dtype"]."""
    torch.manual_seed(c["seed"])
    if c["kind"] == "linear":
        base = nn.Linear(c["K"], c["N"], bias=c["bias"])
    else:
        base = Conv1D(c["K"], c["N"])
        nn.init.normal_(base.weight, std=c["K"] ** -0.5)
        nn.init.normal_(base.bias) if c["bias"] else base.bias.data.zero_()
    base.to(c["dtype"]).requires_grad_(False)
    layer = LoraLayer(base)
    for i, name in enumerate(adapters):
        layer.update_layer(name, c["r"] + i, c["alpha"], init_lora_weights=init, use_rslora=c["rslora"], dtype=c["dtype"])
    layer.active_adapters = list(adapters)
    return layer


def inputs(c):
    return torch.randn(c["B"], c["T"], c["K"], generator=torch.Generator().manual_seed(c["seed"])).to(c["dtype"])


def weight64(layer):
    """The base weight as (K, N) in float64."""
    w = layer.base_layer.weight.double()
    return w if layer.fan_in_fan_out else w.T


def delta64(layer, name):
    """s * B @ A as (out, in), float64."""
    return layer.scaling[name] * layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()


def reference(layer, x, names, magnitude=False):
    """y in float64; with magnitude=True, the same sum over absolute values (the scale of its roundings)."""
    size = torch.abs if magnitude else (lambda t: t)
    y = size(x.double()) @ size(weight64(layer))
    for name in names:
        y = y + size(x.double()) @ size(delta64(layer, name).T)
    bias = layer.base_layer.bias
    return y if bias is None else y + size(bias.double())


@given(layer_cases())
def test_forward_equals_the_equation(c):
    note(c)
    layer = make_layer(c)
    x = inputs(c)
    assert layer.lora_B["a"].weight.abs().max() > 0  # init_lora_weights=False: B is not zero
    assert math.isclose(layer.scaling["a"], c["alpha"] / (math.sqrt(c["r"]) if c["rslora"] else c["r"]))
    assert_close_rel(layer(x), reference(layer, x, ["a"]), c["dtype"])


@given(layer_cases())
def test_merged_output_equals_unmerged(c):
    note(c)
    layer = make_layer(c)
    x = inputs(c)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["a"]
    # Merging rounds W + delta to W's dtype, an error relative to |W| + |delta|, not to their sum.
    magnitude = reference(layer, x, ["a"], magnitude=True).max().item()
    assert_close_rel(layer(x), unmerged.double(), c["dtype"], scale=magnitude)


@given(layer_cases())
def test_merge_then_unmerge_restores_base_weights(c):
    """Each add or subtract rounds once (eps/2) to W's dtype: with two adapters, four roundings, so
    |W'' - W| <= 2 eps (|W| + sum |delta|) elementwise. Measured: up to 1.28 eps (fp32) and 1.02 eps (bf16)
    over 200 layers, and never bit-exact in fp32: the subtraction cannot undo the rounding of W + delta."""
    note(c)
    layer = make_layer(c, adapters=("a", "b"))
    before = layer.base_layer.weight.clone()
    delta = sum(layer.get_delta_weight(n).abs().double() for n in ("a", "b"))
    layer.merge()
    layer.unmerge()
    assert layer.merged_adapters == []
    error = (layer.base_layer.weight.double() - before.double()).abs()
    bound = 2 * torch.finfo(c["dtype"]).eps * (before.double().abs() + delta)
    assert (error <= bound).all(), (error - bound).max()


@given(layer_cases())
def test_disabled_adapter_gives_the_base_output_exactly(c):
    layer = make_layer(c)
    x = inputs(c)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))


@given(layer_cases())
def test_default_init_B_zero_gives_the_base_output(c):
    layer = make_layer(c, init=True)
    x = inputs(c)
    assert layer.lora_B["a"].weight.abs().max() == 0
    assert layer.lora_A["a"].weight.abs().max() <= 1 / math.sqrt(c["K"])  # kaiming-uniform(a=sqrt 5) bound
    assert torch.equal(layer(x), layer.base_layer(x))


def test_gaussian_init_draws_A_with_std_one_over_r():
    layer = LoraLayer(nn.Linear(512, 4))
    layer.update_layer("a", 4, 8, init_lora_weights="gaussian")
    assert abs(layer.lora_A["a"].weight.std().item() - 0.25) < 0.02 and layer.lora_B["a"].weight.abs().max() == 0


@given(layer_cases())
def test_several_active_adapters_add_up(c):
    layer = make_layer(c, adapters=("a", "b"))
    x = inputs(c)
    assert_close_rel(layer(x), reference(layer, x, ["a", "b"]), c["dtype"])


def test_live_dropout_feeds_the_low_rank_path_only():
    """In training the fused call's low-rank path sees D = keep * x / (1 - p) and the base x itself. The
    seed comes from torch's generator, so the same torch seed gives kernels.lora_matmul's D directly
    (identity adapters on a zero weight return D)."""
    c = dict(kind="conv1d", K=16, N=24, r=4, alpha=8, rslora=False, bias=True, dtype=torch.float32, B=2, T=3, seed=0)
    layer = make_layer(c)
    layer.lora_dropout["a"] = nn.Dropout(0.5)
    x = inputs(c)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    eye = torch.eye(c["K"])
    dropped = kernels.lora_matmul(x, torch.zeros(c["K"], c["K"]), eye, eye, 1.0, dropout_p=0.5)
    assert 0 < (dropped == 0).float().mean() < 1
    expected = layer.base_layer(x) + layer.scaling["a"] * layer.lora_B["a"](layer.lora_A["a"](dropped))
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    layer.eval()  # dropout off
    assert_close_rel(layer(x), reference(layer, x, ["a"]), torch.float32)


def test_lora_dtype_other_than_the_base_casts_x_like_peft():
    """bf16 base, fp32 adapter: the low-rank path runs on x cast to fp32, the sum is cast back to bf16."""
    base = nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)
    layer = LoraLayer(base)
    layer.update_layer("a", 4, 8, init_lora_weights=False, dtype=torch.float32)
    layer.active_adapters = ["a"]
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = layer(x)
    low_rank = layer.lora_B["a"](layer.lora_A["a"](x.float())) * layer.scaling["a"]
    assert y.dtype == torch.bfloat16 and torch.equal(y, (base(x) + low_rank).to(torch.bfloat16))


def test_set_scale_multiplies_the_configured_scaling():
    c = dict(kind="linear", K=8, N=8, r=4, alpha=16, rslora=True, bias=True, dtype=torch.float32, B=2, T=2, seed=3)
    layer = make_layer(c)
    x = inputs(c)
    layer.set_scale("a", 0.0)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.set_scale("a", 2.0)
    assert layer.scaling["a"] == 2.0 * 16 / 2  # rsLoRA: alpha / sqrt(r)
    layer.set_scale("missing", 3.0)  # a layer without the adapter ignores it
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.set_scale("a", 1.0)


@given(layer_cases(), st.lists(st.sampled_from(["a", "b", BASE, "elsewhere"]), min_size=1, max_size=5))
def test_mixed_batch_rows_equal_each_row_alone(c, names):
    c = {**c, "B": len(names)}
    note(c)
    layer = make_layer(c, adapters=("a", "b"))
    x = inputs(c)
    mixed = mixed_batch_forward(layer, x, names)
    assert torch.equal(layer(x, adapter_names=names), mixed)
    for i, name in enumerate(names):
        layer.active_adapters = [name]
        assert_close_rel(mixed[i], layer(x[i : i + 1])[0].double(), c["dtype"])
    with pytest.raises(ValueError, match="names for a batch"):
        mixed_batch_forward(layer, x, names + ["a"])


@given(layer_cases())
def test_gradients_reach_the_lora_factors_only(c):
    c = {**c, "dtype": torch.float32}
    layer = make_layer(c)
    x = inputs(c).requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.base_layer.weight.grad is None
    A = layer.lora_A["a"].weight.detach().double().requires_grad_(True)
    B = layer.lora_B["a"].weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = x64 @ weight64(layer) + layer.scaling["a"] * (x64 @ A.T) @ B.T
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.double()
    y.square().sum().backward()
    for got, want in [(layer.lora_A["a"].weight.grad, A.grad), (layer.lora_B["a"].weight.grad, B.grad), (x.grad, x64.grad)]:
        assert_close_rel(got, want, torch.float32)


@given(layer_cases(), st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3), min_size=2, max_size=2))
def test_cat_combination_is_the_weighted_sum_of_deltas(c, weights):
    c = {**c, "dtype": torch.float32}
    layer = make_layer(c, adapters=("a", "b"))
    rank = layer.r["a"] + layer.r["b"]
    A, B = combine_adapters(layer, ["a", "b"], weights, "cat", rank)
    want = sum(w * delta64(layer, n) for n, w in zip("ab", weights))
    assert_close_rel(B.double() @ A.double(), want, torch.float32)
    if rank <= min(c["K"], c["N"]):  # full rank: the truncated SVD loses nothing
        A, B = combine_adapters(layer, ["a", "b"], weights, "svd", rank)
        assert_close_rel(B.double() @ A.double(), want, torch.float32)


def test_linear_combination_of_one_adapter_is_its_weighted_delta():
    c = dict(kind="conv1d", K=12, N=20, r=3, alpha=6, rslora=False, bias=True, dtype=torch.float32, B=1, T=1, seed=5)
    layer = make_layer(c, adapters=("a", "b"))
    A, B = combine_adapters(layer, ["a"], [-0.5], "linear", 3)
    assert_close_rel(B.double() @ A.double(), -0.5 * delta64(layer, "a"), torch.float32)
    with pytest.raises(ValueError, match="equal ranks"):
        combine_adapters(layer, ["a", "b"], [1, 1], "linear", 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_on_the_triton_kernels_equals_the_torch_path(dtype):
    """The layer's batched call through the Triton kernels (interpreted without a GPU), ranks 3 and 4."""
    c = dict(kind="conv1d", K=19, N=13, r=3, alpha=8, rslora=False, bias=True, dtype=dtype, B=5, T=3, seed=7)
    layer = make_layer(c, adapters=("a", "b"))
    x, names = inputs(c), ["b", BASE, "a", "b", "elsewhere"]
    with backend("torch"):
        want = mixed_batch_forward(layer, x, names)
    with backend("triton"):
        got = mixed_batch_forward(layer, x, names)
    assert_close_rel(got, want.double(), dtype)


def test_a_mixed_batch_is_one_batched_call_per_layer(monkeypatch):
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    calls = []
    batched = kernels.lora_matmul_batched
    monkeypatch.setattr(kernels, "lora_matmul_batched", lambda *a, **k: calls.append(a[0].shape) or batched(*a, **k))
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    peft(ids, adapter_names=["other", "default", BASE, "other"])
    assert len(calls) == sum(isinstance(m, LoraLayer) for m in peft.modules()) == 4


@given(layer_cases())
def test_training_two_adapters_in_one_mixed_batch_gives_each_its_own_gradients(c):
    """Gradients of a mixed batch equal the sums over each adapter's rows run alone."""
    c = {**c, "dtype": torch.float32, "B": 4}
    note(c)
    layer = make_layer(c, adapters=("a", "b"))
    x, names = inputs(c), ["a", "b", BASE, "a"]
    weights = torch.randn(*x.shape[:-1], c["N"], generator=torch.Generator().manual_seed(1))
    (mixed_batch_forward(layer, x, names) * weights).sum().backward()
    mixed = {n: (layer.lora_A[n].weight.grad.clone(), layer.lora_B[n].weight.grad.clone()) for n in "ab"}
    layer.zero_grad()
    for i, name in enumerate(names):
        if name != BASE:  # the base row adds nothing to either adapter
            layer.active_adapters = [name]
            (layer(x[i : i + 1]) * weights[i : i + 1]).sum().backward()
    for n in "ab":
        assert_close_rel(mixed[n][0], layer.lora_A[n].weight.grad.double())
        assert_close_rel(mixed[n][1], layer.lora_B[n].weight.grad.double())


def test_one_layer_serves_batches_of_different_row_orders():
    """The cached row index must follow the rows' names from call to call, not only the set of adapters."""
    c = dict(kind="conv1d", K=6, N=5, r=2, alpha=4, rslora=False, bias=True, dtype=torch.float32, B=3, T=2, seed=4)
    layer = make_layer(c, adapters=("a", "b"))
    x = inputs(c)
    with torch.no_grad():
        for names in (["a", "b", BASE], ["b", BASE, "a"], ["b", "a", "a"]):
            mixed = mixed_batch_forward(layer, x, names)
            for i, name in enumerate(names):
                layer.active_adapters = [name]
                assert_close_rel(mixed[i], layer(x[i : i + 1])[0].double())


def test_cached_stacks_follow_in_place_updates_and_scale_changes():
    c = dict(kind="linear", K=9, N=7, r=2, alpha=4, rslora=False, bias=False, dtype=torch.float32, B=3, T=2, seed=3)
    layer = make_layer(c, adapters=("a", "b"))
    x, names = inputs(c), ["a", "b", "a"]
    changes = [lambda: layer.lora_B["b"].weight.mul_(-2.0),  # as an optimizer step does: in place
               lambda: layer.set_scale("a", 3.0)]
    for change in changes:
        with torch.no_grad():
            before = mixed_batch_forward(layer, x, names)
            change()
            after = mixed_batch_forward(layer, x, names)
        assert not torch.allclose(before, after)
        for i, name in enumerate(names):
            layer.active_adapters = [name]
            with torch.no_grad():
                assert_close_rel(after[i], layer(x[i : i + 1])[0].double())
