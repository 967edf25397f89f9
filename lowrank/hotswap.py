"""Adapter hotswap: a loaded LoRA adapter's weights replaced in place, so that a compiled model runs another
adapter without recompiling. PEFT's API (peft.utils.hotswap): `prepare_model_for_compiled_hotswap` before
torch.compile, then `hotswap_adapter` or `PeftModel.load_adapter(..., hotswap=True)`.

torch.compile specialises a graph on the shapes of the tensors it reads and on the Python numbers. Adapters
on the same modules differ in two such things: their rank (the factors' shapes) and their scaling
(lora_alpha / r, a Python float). Preparing zero-pads every adapter's factors to `target_rank`, the largest
rank to be swapped in (the padding adds exact zeros: (x @ [A, 0]) @ [B; 0] = (x @ A) @ B), and turns each
scaling into a 0-dim float64 tensor, which the layer folds into B (LoraLayer.low_rank_factors). A swap then
copies the new factors into those same parameters (a lower rank zero-padded) and writes the new scaling
into the same tensor: the graph sees the same shapes and the same Python values, holding new numbers.

`LoraLayer.r[adapter]` and `lora_alpha[adapter]` keep describing the adapter itself (its rank, not the
padded one; forward reads neither), so set_scale and saving stay exact: a saved adapter holds its factors
without the padding.
"""
import warnings

import torch
from torch import nn

from . import io
from .checks import is_count
from .lora import LoraLayer, base_modules, lora_scaling, set_scaling
from .targets import resolve_config

CHECK_COMPILED = ("error", "warn", "ignore")


def is_compiled(model: nn.Module) -> bool:
    """torch.compile(model) (an OptimizedModule) or model.compile()."""
    return hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None


def lora_layers(model: nn.Module) -> dict:
    """{module path: LoraLayer} of a model, compiled or not (paths as in the model under any wrapper)."""
    return {path: m for path, m in base_modules(getattr(model, "_orig_mod", model)) if isinstance(m, LoraLayer)}


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank=None, config=None,
                                       check_compiled: str = "error") -> None:
    """Prepare `model` (with its first adapter loaded, before torch.compile) for hotswaps that recompile
    nothing: every LoRA adapter's scaling becomes a tensor, and with `target_rank` its factors are
    zero-padded to that rank (lora_A.weight (target_rank, in), lora_B.weight (out, target_rank)).

    target_rank: the largest rank among the adapters to be swapped in; None leaves the ranks as they are.
    config: a LoraConfig or a {name: LoraConfig} dict whose `r` and `rank_pattern` ranks are set to
    target_rank, as PEFT does, for configs that build adapters later. (A PeftModel's own peft_config keeps
    describing its adapters; leave it out.)
    check_compiled: what to do with a model already compiled: "error", "warn" (it will recompile) or "ignore".
    The scaling tensors are made on the adapters' device and stay there (a dict, as PEFT's, not a buffer):
    prepare the model where it will run.

    Raises ValueError, before the model changes, for a bad argument, a model without LoRA layers or an
    adapter whose rank is above target_rank.
    """
    if check_compiled not in CHECK_COMPILED:
        raise ValueError(f"check_compiled={check_compiled!r} must be one of {CHECK_COMPILED}")
    if target_rank is not None and not is_count(target_rank):
        raise ValueError(f"target_rank={target_rank!r} must be None or an integer >= 1")
    if is_compiled(model) and check_compiled != "ignore":
        message = ("prepare_model_for_compiled_hotswap was called on a compiled model; call it before "
                   "torch.compile, or the compiled graphs recompile")
        if check_compiled == "error":
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call prepare_model_for_compiled_hotswap "
                         f"after loading the first adapter and before compiling")
    if target_rank is not None:
        too_large = [f"{path} (adapter {name!r}, rank {m.lora_A[name].weight.shape[0]})"
                     for path, m in layers.items() for name in m.lora_A if m.lora_A[name].weight.shape[0] > target_rank]
        if too_large:
            raise ValueError(f"target_rank={target_rank} is below the rank of {', '.join(too_large[:4])}"
                             f"{' and more' if len(too_large) > 4 else ''}; pass the largest rank of all adapters")
    for m in layers.values():
        for name in m.lora_A:
            if not isinstance(m.scaling[name], torch.Tensor):
                m.scaling[name] = torch.tensor(m.scaling[name], dtype=torch.float64,
                                               device=m.lora_A[name].weight.device)
            if target_rank is not None:
                m.lora_A[name] = padded(m.lora_A[name], target_rank, dim=0)
                m.lora_B[name] = padded(m.lora_B[name], target_rank, dim=1)
    if config is not None and target_rank is not None:
        for lora_config in config.values() if isinstance(config, dict) else [config]:
            lora_config.r = target_rank
            lora_config.rank_pattern = {key: target_rank for key in lora_config.rank_pattern}


def padded(linear: nn.Linear, rank: int, dim: int) -> nn.Linear:
    """A bias-free nn.Linear whose weight is `linear`'s, zero-padded along `dim` (0: lora_A's rows, 1: lora_B's
    columns) to `rank`; `linear` itself when it has that rank already."""
    weight = linear.weight
    if weight.shape[dim] == rank:
        return linear
    shape = (rank, weight.shape[1]) if dim == 0 else (weight.shape[0], rank)
    out = nn.Linear(shape[1], shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.zero_()
        out.weight.narrow(dim, 0, weight.shape[dim]).copy_(weight)
    out.weight.requires_grad_(weight.requires_grad)
    return out


def check_swap(model: nn.Module, adapter_name: str, config, tensors: dict, live: dict, source) -> tuple:
    """(config as it applies to `model`, {module path: (r, lora_alpha)}) of the new adapter, after checking
    that it can replace `adapter_name` in place; ValueError naming `source` and what differs otherwise.

    tensors: the new adapter's {file key: tensor}, checked against `config` (io.match_tensors); live: the
    model's {file key: tensor} of the adapter now there (PeftModel.adapter_tensors).
    """
    prefix = f"{source}: cannot hotswap into adapter {adapter_name!r}"
    if tensors.keys() != live.keys():
        missing, extra = sorted(live.keys() - tensors.keys()), sorted(tensors.keys() - live.keys())
        raise ValueError(f"{prefix}: it holds other modules (a hotswap replaces weights, it adds or removes no "
                         f"layer); keys only in the loaded adapter: {missing[:4]}, only in the new one: {extra[:4]}")
    layers = lora_layers(model)
    config, plan = resolve_config(model, config)
    for path, (r, alpha) in plan.items():
        m = layers[path]
        if adapter_name in m.merged_adapters:
            raise ValueError(f"{prefix}: it is merged into the weights; call unmerge_adapter() first")
        capacity = m.lora_A[adapter_name].weight.shape[0]
        if r > capacity:
            raise ValueError(f"{prefix}: {path} has rank {r} in the new adapter, above the loaded one's "
                             f"{capacity}; call prepare_model_for_compiled_hotswap(model, target_rank={r} or more) "
                             f"before compiling")
        scaling = lora_scaling(alpha, r, config.use_rslora)
        if not isinstance(m.scaling[adapter_name], torch.Tensor) and scaling != m.scaling[adapter_name]:
            raise ValueError(f"{prefix}: {path} has scaling {scaling} in the new adapter and "
                             f"{m.scaling[adapter_name]} in the loaded one, held as a Python number that a compiled "
                             f"graph bakes in; call prepare_model_for_compiled_hotswap(model) before compiling")
        dropout = m.lora_dropout[adapter_name]
        if getattr(dropout, "p", 0.0) != config.lora_dropout:
            raise ValueError(f"{prefix}: lora_dropout is {config.lora_dropout} in the new adapter and "
                             f"{getattr(dropout, 'p', 0.0)} in the loaded one")
    return config, plan


@torch.no_grad()
def swap_in(model: nn.Module, adapter_name: str, config, plan: dict, tensors: dict, live: dict) -> None:
    """Copy the new adapter (checked by check_swap) into `adapter_name`'s parameters and scalings in place."""
    layers = lora_layers(model)
    for path, (r, alpha) in plan.items():
        m = layers[path]
        for factor, dim in ((m.lora_A[adapter_name].weight, 0), (m.lora_B[adapter_name].weight, 1)):
            new = tensors[f"{io.PREFIX}{path}.lora_{'A' if dim == 0 else 'B'}.weight"]
            factor.narrow(dim, 0, r).copy_(new)
            factor.narrow(dim, r, factor.shape[dim] - r).zero_()
        m.r[adapter_name], m.lora_alpha[adapter_name], m.use_rslora[adapter_name] = r, alpha, config.use_rslora
        set_scaling(m, adapter_name, lora_scaling(alpha, r, config.use_rslora))
    for key, tensor in tensors.items():
        if ".lora_A.weight" not in key and ".lora_B.weight" not in key:
            live[key].copy_(tensor)


def hotswap_adapter(model: nn.Module, model_name_or_path, adapter_name: str) -> None:
    """Replace the loaded adapter `adapter_name` of a PeftModel (or of torch.compile(PeftModel)) with the one
    saved at `model_name_or_path`, in place, keeping its name and whether it trains (PEFT's hotswap_adapter).
    See PeftModel.load_adapter(..., hotswap=True) for what must match."""
    peft = getattr(model, "_orig_mod", model)
    if adapter_name not in getattr(peft, "peft_config", {}):
        raise ValueError(f"cannot hotswap into adapter {adapter_name!r}: the model has "
                         f"{sorted(getattr(peft, 'peft_config', {}))}")
    peft.load_adapter(model_name_or_path, adapter_name, is_trainable=not peft.peft_config[adapter_name].inference_mode,
                      hotswap=True)
