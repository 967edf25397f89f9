"""get_peft_model and PeftModel: LoRA layers injected by module name, or soft prompts (lowrank.prompts) put
into the model's inputs; the rest frozen; many adapters of one kind.

Names follow PEFT so that code and state dicts carry over. With LoRA, `PeftModel.base_model.model` is the
wrapped model, parameters read `base_model.model.<HF path>.lora_A.<adapter>.weight`, and a module in
`modules_to_save` becomes `<path>.original_module` + `<path>.modules_to_save.<adapter>`. With soft prompts,
`PeftModel.base_model` is the model itself and the prompt encoders are `prompt_encoder.<adapter>.*`.
"""
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import io
from .checks import is_count, is_number
from .errors import CheckpointError
from .files import checked_name
from .hotswap import check_swap, swap_in
from .config import LoraConfig, PeftConfig
from .lora import BASE, LoraLayer, ModulesToSaveWrapper
from .methods import method_for


class PeftModel(nn.Module):
    """A model with LoRA adapters or soft prompts. forward/generate take the base model's arguments (and
    return what it returns), plus, with LoRA, `adapter_names` (one per row; "__base__" for none) to mix
    adapters in a batch. Attributes the wrapper lacks (config, prefill, decode_step, ...) are the base model's.
    What differs between the two families is done by one object, `self.method` (lowrank.methods)."""

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_config(peft_config)
        if any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} already holds adapter layers (it is wrapped by another "
                             f"PeftModel); add adapters through that PeftModel (add_adapter, load_adapter)")
        self.method = method_for(peft_config)(model, autocast_adapter_dtype)
        for name, module in self.method.submodules().items():  # base_model (and prompt_encoder), PEFT's names
            self.add_module(name, module)
        self.peft_config: dict = {}
        self._active = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.add_adapter(adapter_name, peft_config)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "method"):
                raise
            return getattr(self.get_base_model(), name)

    @property
    def active_adapters(self) -> list:
        return list(self._active)

    @property
    def active_adapter(self):
        """The active adapter's name; a list when several are active (PEFT's convention)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def get_base_model(self) -> nn.Module:
        return self.method.model

    # -- running --

    def forward(self, *args, adapter_names=None, **kwargs):
        return self.method.forward(self._active, self.peft_config, args, kwargs, adapter_names)

    def generate(self, *args, adapter_names=None, **kwargs):
        """The base model's generate; with adapter_names every decode step keeps each row's adapter; with a
        soft prompt the prompt goes in at prefill and the output holds only real tokens. cache_implementation=
        "static" and compile= (models.generate) trace the active LoRA layers into the compiled decode step."""
        return self.method.generate(self._active, self.peft_config, args, kwargs, adapter_names)

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first)."""
        with self.method.disabled():
            yield

    # -- adapters --

    def add_adapter(self, adapter_name: str, peft_config) -> None:
        """Add a new adapter (inactive unless it is the first): LoRA layers, or a soft prompt's encoder.
        Everything is checked before the model changes."""
        checked_name(adapter_name, "adapter name")
        _check_config(peft_config)
        if adapter_name in self.peft_config or adapter_name == BASE:
            raise ValueError(f"adapter name {adapter_name!r} is taken")
        if not self.method.takes(peft_config):
            raise ValueError(f"cannot add a {peft_config.peft_type} adapter to a model with {self.method.kind}")
        self.peft_config[adapter_name] = self.method.add(adapter_name, _for_task(self.get_base_model(), peft_config))
        self._sync()

    def set_adapter(self, adapter_name) -> None:
        """Make one adapter, or a list of adapters that add up, active (and trainable unless loaded for
        inference). Merged adapters are unmerged first, as PEFT does."""
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"adapter_name={adapter_name!r} must be an adapter's name or a non-empty list of names")
        names = list(names)
        self._check_names(names)
        self.method.check_active(names)
        self._active = names
        self._sync()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names([adapter_name])
        if list(self.peft_config) == [adapter_name]:
            raise ValueError(f"adapter {adapter_name!r} is the only one; a PeftModel keeps at least one (unload() "
                             f"returns the plain model)")
        self.method.delete(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name] or list(self.peft_config)[:1]
        self._sync()

    def _check_names(self, names) -> None:
        if not self.peft_config:
            raise ValueError("this PeftModel has no adapters left (merge_and_unload or unload took them out)")
        unknown = [n for n in names if not isinstance(n, str) or n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this model has {sorted(self.peft_config)}")

    def _sync(self) -> None:
        """Push the active adapters to the model; they train (unless loaded for inference), all else is frozen."""
        trainable = {a for a in self._active if not self.peft_config[a].inference_mode}
        self.method.sync(self._active, trainable, self.peft_config)

    # -- merging --

    def merge_adapter(self, adapter_names=None) -> None:
        """Fold adapters (default: the active ones) into the base weights."""
        if adapter_names is not None:
            self._check_names(adapter_names)
        self.method.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        self.method.unmerge()

    def merge_and_unload(self, adapter_names=None) -> nn.Module:
        """The plain base model with the adapters folded into its weights (and the active adapter's trained
        copies of modules_to_save in place); no wrapper is left."""
        self.merge_adapter(adapter_names)
        return self._unload(keep_copies=True)

    def unload(self) -> nn.Module:
        """The plain base model as it was: merged adapters are taken out, LoRA dropped, original modules back."""
        self.unmerge_adapter()
        return self._unload(keep_copies=False)

    def _unload(self, keep_copies: bool) -> nn.Module:
        model = self.method.unload(self._active, keep_copies)
        self.peft_config.clear()
        self._active = []
        return model

    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "svd",
                             svd_rank=None) -> None:
        """A new adapter mixing `adapters` with `weights` (see lora.combine_adapters): "cat" (rank = sum of
        ranks, exact), "svd" (rank svd_rank, default the largest rank; exact at full rank) or "linear"
        (equal ranks, PEFT's approximation). The new adapter has lora_alpha = r, so scaling 1."""
        if not isinstance(adapters, (list, tuple)) or not adapters or not isinstance(weights, (list, tuple)):
            raise ValueError(f"adapters={adapters!r} and weights={weights!r} must be non-empty lists of one length")
        self._check_names(adapters)
        if len(weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        if not all(is_number(w) for w in weights):
            raise ValueError(f"weights={list(weights)!r} must be finite numbers")
        if svd_rank is not None and not is_count(svd_rank):
            raise ValueError(f"svd_rank={svd_rank!r} must be None (the largest rank) or an integer >= 1")
        if combination_type not in ("svd", "linear", "cat"):
            raise ValueError(f"combination_type={combination_type!r} must be 'svd', 'linear' or 'cat'")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        config, ranks = self.method.weighted_config([self.peft_config[a] for a in adapters], combination_type)
        rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
        self.add_adapter(adapter_name, replace(config, r=rank, lora_alpha=rank))
        self.method.fill_weighted(adapter_name, adapters, weights, combination_type, rank)

    # -- counting --

    def get_nb_trainable_parameters(self) -> tuple:
        """(trainable, all) parameter counts, each shared parameter counted once (PEFT's numbers)."""
        counts = [(p.numel(), p.requires_grad) for p in self.parameters()]
        return sum(n for n, t in counts if t), sum(n for n, _ in counts)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- files (docs/formats.md C) --

    def adapter_tensors(self, adapter_name: str) -> dict:
        """{file key: tensor} of what adapter_model.safetensors holds for this adapter (docs/formats.md C.2; a
        soft prompt: its encoder's output, D.2, E.2, F). Live parameters where the file holds parameters."""
        return self.method.tensors(adapter_name, self.peft_config[adapter_name])

    def save_pretrained(self, save_directory, selected_adapters=None) -> None:
        """adapter_config.json + adapter_model.safetensors per adapter, PEFT's format; adapters other than
        "default" go into a subfolder named after them. Each adapter's two files are written as one change of
        its folder (files.write_folder)."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_names(names)
        for name in names:  # again here, in case peft_config was edited by hand: a subfolder, never outside
            checked_name(name, "adapter name")
        for name in names:
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = replace(self.peft_config[name], inference_mode=True)
            io.write_adapter(folder, config.to_dict(), self.adapter_tensors(name))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        autocast_adapter_dtype: bool = True) -> "PeftModel":
        """Wrap `model` with the adapter saved at `model_id`; the file is checked in full first."""
        checked_name(adapter_name, "adapter name")
        _check_flag("is_trainable", is_trainable)
        config, tensors = _read_checked(model, model_id, is_trainable)
        peft = cls(model, config, adapter_name, autocast_adapter_dtype)
        peft._copy_in(adapter_name, tensors)
        return peft

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, hotswap: bool = False) -> None:
        """Add the adapter saved at `model_id` under `adapter_name` (not activated, as in PEFT).

        hotswap=True: replace the loaded LoRA adapter `adapter_name` in place instead (transformers' and
        diffusers' flag, PEFT's hotswap_adapter; see lowrank.hotswap): its parameters keep their identity and
        shapes, so a compiled model does not recompile. The new adapter must target the same modules, with
        ranks up to the loaded one's (padded: prepare_model_for_compiled_hotswap) and the same scalings unless
        the model was prepared; otherwise ValueError, before anything changes."""
        checked_name(adapter_name, "adapter name")
        _check_flag("is_trainable", is_trainable)
        _check_flag("hotswap", hotswap)
        if hotswap:
            self._check_names([adapter_name])
            _check_lora(adapter_name, self.peft_config[adapter_name], "loaded")
        config, tensors = _read_checked(self.get_base_model(), model_id, is_trainable)
        if not hotswap:
            self.add_adapter(adapter_name, config)
            self._copy_in(adapter_name, tensors)
            return
        _check_lora(model_id, config, "new")
        live = self.adapter_tensors(adapter_name)
        config, plan = check_swap(self.get_base_model(), adapter_name, config, tensors, live, model_id)
        swap_in(self.get_base_model(), adapter_name, config, plan, tensors, live)
        self.peft_config[adapter_name] = config
        self._sync()

    @torch.no_grad()
    def _copy_in(self, adapter_name: str, tensors: dict) -> None:
        live = self.adapter_tensors(adapter_name)
        assert live.keys() == tensors.keys(), sorted(live.keys() ^ tensors.keys())
        for key, tensor in tensors.items():
            live[key].copy_(tensor)


def _check_config(peft_config) -> None:
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig instance (LoraConfig(...), PromptTuningConfig(...), ...), "
                        f"got {peft_config!r}")


def _for_task(model: nn.Module, config):
    """config.with_task_modules(), and for SEQ_CLS a model that has a classification head."""
    config = config.with_task_modules()
    if config.task_type == "SEQ_CLS" and not any(config.is_module_to_save(n) for n, _ in model.named_modules()):
        raise ValueError(f"task_type='SEQ_CLS' needs a sequence classification model (a 'score' or 'classifier' "
                         f"head), not a {type(model).__name__}; load it with models.from_pretrained(path, "
                         f"task_type='SEQ_CLS')")
    return config


def _check_lora(source, config, which: str) -> None:
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{source}: hotswap replaces LoRA adapters; the {which} adapter is {config.peft_type}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")


def _read_checked(model: nn.Module, model_id, is_trainable: bool) -> tuple:
    """(config, tensors by expected key) of a saved adapter, checked against `model` before it is touched."""
    config, tensors, config_file, weights_file = io.read_adapter(model_id)
    config = replace(config, inference_mode=not is_trainable)
    try:
        config = _for_task(model, config)
        expected = method_for(config).expected_shapes(model, config, is_trainable)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return config, io.match_tensors(tensors, expected, weights_file, getattr(model, "base_model_prefix", None))


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """Wrap `model`: LoRA on the targeted modules and trainable copies of modules_to_save (a LoraConfig), or a
    trainable soft prompt (a PromptTuningConfig, PrefixTuningConfig or PromptEncoderConfig); everything else
    frozen.

    autocast_adapter_dtype: adapters of fp16/bf16 layers are kept in fp32 (PEFT's default; the fused kernel
    takes them as they are, lowrank.lora.LoraLayer.adapter_forward); False keeps them in the layer's dtype.
    """
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)
