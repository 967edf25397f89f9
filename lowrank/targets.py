"""Which modules of a model a LoraConfig wraps: defaults by model type, name matching (the rules live in
LoraConfig.is_target), layer-kind checks and the fan_in_fan_out fix-up, all before the model changes."""
import warnings
from dataclasses import replace

from torch import nn

from .config import ENCODER_DECODER_TASKS, LoraConfig, is_encoder_decoder
from .lora import LoraLayer, base_modules, is_conv1d

DEFAULT_TARGET_MODULES = {  # PEFT's table, docs/formats.md C.4
    "gpt2": ["c_attn"], "t5": ["q", "v"], "mt5": ["q", "v"], "gpt_neo": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLayer)) or is_conv1d(module)


def model_type(model: nn.Module):
    """config.model_type, or config.to_dict()["model_type"] for config classes that keep it there."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind is None and hasattr(config, "to_dict"):
        kind = config.to_dict().get("model_type")
    return kind


def find_targets(model: nn.Module, config: LoraConfig) -> dict:
    """{module path: (r, lora_alpha)} for every module `config` targets; ValueError if there are none
    or one is not a linear layer."""
    targets = {}
    for name, module in base_modules(model):
        if config.is_target(name):
            if not _is_linear(module):
                raise ValueError(f"target {name!r} is a {type(module).__name__}; LoRA wraps nn.Linear and Conv1D layers")
            targets[name] = config.rank_and_alpha(name)
    if not targets:
        linear = [name for name, module in base_modules(model) if _is_linear(module)]
        raise ValueError(f"target_modules={config.target_modules!r} match no module of {type(model).__name__} "
                         f"(layers_to_transform={config.layers_to_transform!r}); its linear modules include {linear[:6]}")
    return targets


def find_modules_to_save(model: nn.Module, config) -> list:
    paths = [name for name, _ in base_modules(model) if config.is_module_to_save(name)]
    if config.modules_to_save and not paths:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} match no module of {type(model).__name__}")
    return paths


def resolve_config(model: nn.Module, config: LoraConfig) -> tuple:
    """(config as it applies to `model`, its targets): target_modules filled in (the model type's default;
    "all-linear" -> the full names of every linear but the output head) and fan_in_fan_out set from the
    targets' layout, as PEFT does. Raises ValueError, naming the problem, before anything changes."""
    targets = config.target_modules
    if targets is None:
        if model_type(model) not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"target_modules=None: no default for model_type={model_type(model)!r}; "
                             f"known defaults: {DEFAULT_TARGET_MODULES}")
        targets = DEFAULT_TARGET_MODULES[model_type(model)]
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        head = getattr(model, "lm_head", None)
        targets = [name for name, m in base_modules(model) if _is_linear(m) and m is not head]
    wants_enc_dec = ENCODER_DECODER_TASKS.get(config.task_type)
    if wants_enc_dec is not None and wants_enc_dec != is_encoder_decoder(model):
        raise ValueError(f"task_type={config.task_type!r} does not fit a {type(model).__name__}")
    plan = find_targets(model, replace(config, target_modules=targets))
    layers = [model.get_submodule(path) for path in plan]
    fan_in_fan_out = any(m.fan_in_fan_out if isinstance(m, LoraLayer) else is_conv1d(m) for m in layers)
    if config.fan_in_fan_out and not fan_in_fan_out:  # asked for explicitly, and wrong; the default is silent
        warnings.warn("fan_in_fan_out=True does not match the targeted layers (nn.Linear, weight (out, in)); "
                      "set to False", stacklevel=3)
    return replace(config, target_modules=targets, fan_in_fan_out=fan_in_fan_out), plan
