"""Adapter files in and out: adapter_config.json + adapter_model.safetensors, PEFT's format (docs/formats.md C-F).

Which tensors a file holds, by key: `adapter_tensors` (from a model that has the adapter) and
`expected_shapes` (from a plan, before the model is touched) describe the same layout. Reads go through
safetensors only, never pickle. An adapter's two files are written as one change of its folder
(files.write_folder), so a crash leaves the old adapter or the new one, never half of one.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import config_from_dict
from .errors import CheckpointError
from .files import finish_interrupted_write, read_json_object, write_folder
from .lora import LoraLayer, ModulesToSaveWrapper, base_modules, linear_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # every LoRA/bias/modules_to_save key in the file starts with it
PROMPT_KEY = "prompt_embeddings"  # a soft prompt's file holds this tensor (docs/formats.md D.2, E.2, F)
PROMPT_COPY_PREFIX = "base_model."  # and its module copies (SEQ_CLS's score) under this, as PEFT's (D.4)


def layer_biases(model: nn.Module, lora_paths, mode: str) -> dict:
    """{in-memory name: parameter} of the biases an adapter with bias=`mode` trains and saves: "lora_only"
    -> those of its LoRA layers at `lora_paths` (`<path>.base_layer.bias`); "all" -> also every parameter
    whose name contains "bias" (PEFT's rule, which takes in T5's relative_attention_bias too)."""
    out = {}
    for name, module in base_modules(model) if mode != "none" else ():
        if isinstance(module, LoraLayer) or name in lora_paths:
            bias = (module.base_layer if isinstance(module, LoraLayer) else module).bias
            if bias is not None and (mode == "all" or name in lora_paths):
                out[f"{name}.base_layer.bias"] = bias
        elif mode == "all" and not isinstance(module, ModulesToSaveWrapper):
            out.update({f"{name}.{p}": t for p, t in module.named_parameters(recurse=False) if "bias" in f"{name}.{p}"})
    return out


def adapter_tensors(model: nn.Module, adapter: str, bias: str) -> dict:
    """{file key: live tensor} of what adapter_model.safetensors holds for `adapter` (docs/formats.md C.2): LoRA
    factors without the adapter name (views of their first r ranks: lowrank.hotswap may zero-pad them), module
    copies under the original module's name, selected biases."""
    out, lora_paths = {}, set()
    for path, m in base_modules(model):
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            r = m.r[adapter]
            out[f"{path}.lora_A.weight"] = m.lora_A[adapter].weight[:r]
            out[f"{path}.lora_B.weight"] = m.lora_B[adapter].weight[:, :r]
            lora_paths.add(path)
    out.update(copy_tensors(model, adapter))
    out.update(layer_biases(model, lora_paths, bias))
    return {PREFIX + k: v for k, v in out.items()}


def copy_tensors(model: nn.Module, adapter: str) -> dict:
    """{path.name: live tensor} of `adapter`'s trained module copies (modules_to_save), keyed by the module
    they replace."""
    out = {}
    for path, m in base_modules(model):
        if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save:
            out.update({f"{path}.{k}": t for k, t in m.modules_to_save[adapter].state_dict(keep_vars=True).items()})
    return out


def copy_shapes(model: nn.Module, to_save) -> dict:
    """{path.name: shape} of the module copies at `to_save`: copy_tensors' layout, before anything is added."""
    shapes = {}
    for path in to_save:
        module = model.get_submodule(path)
        module = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        shapes.update({f"{path}.{k}": tuple(t.shape) for k, t in module.state_dict().items()})
    return shapes


def expected_shapes(model: nn.Module, plan: dict, to_save, bias: str) -> dict:
    """{file key: shape} of the file an adapter with LoRA at `plan` ({path: (r, alpha)}), module copies at
    `to_save` and bias mode `bias` has: the layout of adapter_tensors, computed before anything is added."""
    shapes = {}
    for path, (r, _) in plan.items():
        fan_in, fan_out = linear_features(model.get_submodule(path))
        shapes[f"{path}.lora_A.weight"], shapes[f"{path}.lora_B.weight"] = (r, fan_in), (fan_out, r)
    shapes.update(copy_shapes(model, to_save))
    shapes.update({k: tuple(t.shape) for k, t in layer_biases(model, set(plan), bias).items()})
    return {PREFIX + k: v for k, v in shapes.items()}


def write_adapter(folder, config: dict, tensors: dict) -> None:
    """Write config (a to_dict()) and tensors ({file key: tensor}) into folder. Half-precision tensors are
    stored as fp32, as PEFT stores autocast adapters; every tensor is saved contiguous, on the CPU."""
    tensors = {k: _for_file(t) for k, t in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_folder(folder, {WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                          CONFIG_NAME: lambda tmp: Path(tmp).write_text(text)})


def _for_file(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).contiguous()


def read_adapter(path) -> tuple:
    """(config, {file key: tensor}, config file, weights file) of the adapter saved in folder `path`.
    CheckpointError (naming the file) for a bad config, a pickle-only adapter or an unreadable weights file."""
    folder = Path(path)
    if folder.is_dir():
        finish_interrupted_write(folder)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no adapter config in {folder}")
    if not weights_file.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise CheckpointError(f"{folder / PICKLE_NAME}: a pickle (torch.save) file, which can run code when read; "
                             f"lowrank reads adapters through safetensors only. Convert it once, trusting its source: "
                             f"safetensors.torch.save_file(torch.load(path, weights_only=True), '{WEIGHTS_NAME}')")
        raise FileNotFoundError(f"{weights_file}: no adapter weights in {folder}")
    config = read_adapter_config(config_file)
    try:
        tensors = load_file(weights_file)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(f"{weights_file}: not a readable safetensors file: {e}") from None
    return config, tensors, config_file, weights_file


def read_adapter_config(file: Path):
    """The PEFT config in an adapter_config.json; CheckpointError naming the file for anything invalid."""
    try:
        return config_from_dict(read_json_object(file), source=str(file))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def match_tensors(tensors: dict, expected: dict, source, base_model_prefix=None) -> dict:
    """The file's tensors keyed as `expected` ({key: shape}), or CheckpointError naming `source` and every
    missing key, unexpected key and wrong shape.

    base_model_prefix: the model's hook of that name (GPT-2: "transformer"): a key without it after PREFIX
    (an adapter trained on the headless model, GPT2Model) is taken for the key it names (docs/formats.md C.2).
    """
    found, unexpected = {}, []
    for key, tensor in tensors.items():
        alias = PREFIX + f"{base_model_prefix}." + key[len(PREFIX):] if base_model_prefix else None
        name = alias if key not in expected and key.startswith(PREFIX) and alias in expected else key
        if name in expected and name not in found:
            found[name] = tensor
        else:
            unexpected.append(key)
    problems = [f"missing key {k!r} (expected shape {expected[k]})" for k in expected if k not in found]
    problems += [f"unexpected key {k!r} with shape {tuple(tensors[k].shape)}" for k in unexpected]
    problems += [f"key {k!r} has shape {tuple(t.shape)}, expected {expected[k]}"
                 for k, t in found.items() if tuple(t.shape) != tuple(expected[k])]
    problems += [f"key {k!r} has dtype {t.dtype}, expected a floating dtype" for k, t in found.items()
                 if not t.is_floating_point()]
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(f"{source}: " + "; ".join(problems[:8]) + more)
    return found
