"""The two method families a PeftModel runs, one object each: LoRA adapters (layers injected by module name)
and soft prompts (an encoder per adapter whose output goes into the model's inputs). PeftModel keeps PEFT's
facade and names and hands every method-specific step to one of these, so none of its public methods
branches on the method.

Both give: `base_model` (what PeftModel registers under that name), add / delete an adapter, check which
adapters may be active together, push the active ones to the model (`sync`), run forward and generate,
switch the adapters off, the tensors an adapter's file holds and the shapes it must have, merge, unload.
"""
import warnings
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from . import io, prompts
from .config import PromptLearningConfig
from .lora import BASE, LoraLayer, ModulesToSaveWrapper, base_modules, combine_adapters
from .targets import find_modules_to_save, resolve_config


def add_copies(model: nn.Module, name: str, paths, wrapped: dict) -> None:
    """A trainable copy of each module at `paths` for adapter `name` (ModulesToSaveWrapper); `wrapped`
    records {path: the module it held} for each wrapper made, so that a failure can be rolled back."""
    for path in paths:
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapped[path], wrapper = wrapper, ModulesToSaveWrapper(wrapper)
            model.set_submodule(path, wrapper)
        wrapper.update(name)


def roll_back(model: nn.Module, layers: list, name: str, wrapped: dict) -> None:
    """Take adapter `name` out of `layers` and put back the modules `wrapped` replaced."""
    for m in layers:
        m.delete_adapter(name)
    for path, module in wrapped.items():
        model.set_submodule(path, module)


def activate(layers: list, active: list, trainable: set) -> None:
    """Active adapters to every adapter layer; the trainable ones' factors and copies train."""
    for m in layers:
        m.active_adapters = list(active)
        for table in [m.modules_to_save] if isinstance(m, ModulesToSaveWrapper) else [m.lora_A, m.lora_B]:
            for adapter, module in table.items():
                module.requires_grad_(adapter in trainable)


@contextmanager
def layers_disabled(layers: list):
    """Every adapter layer runs its base module alone inside the block."""
    was_disabled = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)


def unload_layers(model: nn.Module, active: list, keep_copies: bool) -> nn.Module:
    """`model` with LoRA layers replaced by their base layers, and module copies by the active adapter's
    copy (keep_copies) or the original."""
    for path, m in list(base_modules(model)):
        if isinstance(m, LoraLayer):
            model.set_submodule(path, m.base_layer)
        elif isinstance(m, ModulesToSaveWrapper):
            adapter = next((a for a in active if a in m.modules_to_save), None)
            model.set_submodule(path, m.module_for(adapter) if keep_copies else m.original_module)
    return model


class LoraModel(nn.Module):
    """Holds the wrapped model as `.model`, so parameter names read `base_model.model.<path>` as in PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class LoraMethod:
    """LoRA layers and trainable module copies (modules_to_save), several adapters in one model."""

    kind = "LoRA adapters"

    def __init__(self, model: nn.Module, autocast_adapter_dtype: bool):
        self.base_model = LoraModel(model)
        self.model = model
        self.autocast_adapter_dtype = autocast_adapter_dtype

    @staticmethod
    def takes(config) -> bool:
        return not isinstance(config, PromptLearningConfig)

    def submodules(self) -> dict:
        return {"base_model": self.base_model}

    def layers(self) -> list:
        return [m for _, m in base_modules(self.model) if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]

    def _lora_layers(self) -> list:
        return [m for m in self.layers() if isinstance(m, LoraLayer)]

    def merged(self) -> bool:
        return any(getattr(m, "merged_adapters", None) for m in self.layers())

    # -- adapters --

    def add(self, name: str, config):
        """Inject `name` into every targeted layer (all checked first, by resolve_config); the resolved config.
        If a layer still fails (memory for a huge rank), every layer added so far is taken out again."""
        config, plan = resolve_config(self.model, config)
        to_save = find_modules_to_save(self.model, config)
        taken = [p for p in to_save if isinstance(self.model.get_submodule(p), LoraLayer)]
        if taken:
            raise ValueError(f"modules_to_save={config.modules_to_save!r} names {taken}, which hold LoRA layers of "
                             f"another adapter; a module is either adapted or copied")
        wrapped = {}  # path -> the module it held before this call wrapped it
        try:
            for path, (r, alpha) in plan.items():
                layer = self.model.get_submodule(path)
                if not isinstance(layer, LoraLayer):
                    wrapped[path], layer = layer, LoraLayer(layer)
                    self.model.set_submodule(path, layer)
                weight_dtype = layer.base_layer.weight.dtype
                upcast = self.autocast_adapter_dtype and weight_dtype in (torch.float16, torch.bfloat16)
                layer.update_layer(name, r, alpha, config.lora_dropout, config.init_lora_weights,
                                   config.use_rslora, dtype=torch.float32 if upcast else weight_dtype)
            add_copies(self.model, name, to_save, wrapped)
        except BaseException as e:
            roll_back(self.model, self.layers(), name, wrapped)
            if isinstance(e, RuntimeError):  # the allocator's, for a rank too large for memory
                raise ValueError(f"adapter {name!r} could not be built (r={config.r}, nothing was added): "
                                 f"{' '.join(str(e).split())[:160]}") from None
            raise
        return config

    def delete(self, name: str) -> None:
        layers = self.layers()
        if any(name in getattr(m, "merged_adapters", ()) for m in layers):
            raise ValueError(f"adapter {name!r} is merged; call unmerge_adapter() before deleting it")
        for m in layers:
            m.delete_adapter(name)

    def check_active(self, names: list) -> None:
        """Any set of LoRA adapters may be active (their deltas add up); merged ones are unmerged first."""
        if self.merged():
            warnings.warn("unmerging the merged adapters before switching", stacklevel=3)
            self.unmerge()

    def sync(self, active: list, trainable: set, configs: dict) -> None:
        """Active adapters to every layer; the trainable ones' factors, copies and selected biases train."""
        bias_params = {}
        for a in trainable:
            paths = {n for n, m in base_modules(self.model) if isinstance(m, LoraLayer) and a in m.lora_A}
            bias_params.update(io.layer_biases(self.model, paths, configs[a].bias))
        self.model.requires_grad_(False)
        activate(self.layers(), active, trainable)
        for p in bias_params.values():
            p.requires_grad_(True)

    # -- running --

    def forward(self, active: list, configs: dict, args, kwargs, adapter_names):
        with self._rows(configs, adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, active: list, configs: dict, args, kwargs, adapter_names):
        with self._rows(configs, adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def _rows(self, configs: dict, adapter_names):
        """Route row i of every adapter layer's input through adapter_names[i] for the duration."""
        if adapter_names is None:
            yield
            return
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names={adapter_names!r} must be a list of adapter names, one per row")
        unknown = sorted(set(adapter_names) - set(configs) - {BASE})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {sorted(configs)} and {BASE!r}")
        layers = self.layers()
        if self.merged():
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        for m in layers:
            m.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            for m in layers:
                m.row_adapters = None

    def disabled(self):
        """The base model alone inside the block."""
        return layers_disabled(self.layers())

    # -- files --

    def tensors(self, name: str, config) -> dict:
        return io.adapter_tensors(self.model, name, config.bias)

    @staticmethod
    def expected_shapes(model: nn.Module, config, is_trainable: bool) -> dict:
        """{file key: shape} of the file an adapter with `config` has on `model`, before anything is added."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fan_in_fan_out correction is announced when the adapter is added
            resolved, plan = resolve_config(model, config)
        return io.expected_shapes(model, plan, find_modules_to_save(model, resolved), resolved.bias)

    # -- merging --

    def merge(self, adapter_names) -> None:
        for m in self._lora_layers():
            m.merge(adapter_names)

    def unmerge(self) -> None:
        for m in self._lora_layers():
            m.unmerge()

    def unload(self, active: list, keep_copies: bool) -> nn.Module:
        return unload_layers(self.model, active, keep_copies)

    def weighted_config(self, configs: list, combination_type: str):
        """(the combined adapter's config, its rank) for add_weighted_adapter (see lora.combine_adapters)."""
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
        if combination_type == "linear" and len(set(ranks)) > 1:
            raise ValueError(f"combination_type='linear' needs equal ranks; the adapters have {ranks}")
        kinds = {isinstance(c.target_modules, str) for c in configs}
        if len(kinds) > 1:
            raise ValueError("cannot combine adapters whose target_modules mix regex strings and lists")
        targets = ("|".join(f"({c.target_modules})" for c in configs) if kinds == {True}
                   else list(dict.fromkeys(t for c in configs for t in c.target_modules)))
        return replace(configs[0], target_modules=targets, rank_pattern={}, alpha_pattern={}, use_rslora=False), ranks

    @torch.no_grad()
    def fill_weighted(self, name: str, adapters, weights, combination_type: str, rank: int) -> None:
        for m in self._lora_layers():
            if name in m.lora_A:
                A, B = combine_adapters(m, adapters, weights, combination_type, rank)
                m.lora_A[name].weight.copy_(A)
                m.lora_B[name].weight.copy_(B)


class SoftPromptMethod:
    """Soft prompts (prompt tuning, prefix tuning, P-tuning): one encoder per adapter, one active at a time,
    and trainable copies of modules_to_save (SEQ_CLS's score head), as PEFT gives prompt learning."""

    kind = "soft prompts"

    def __init__(self, model: nn.Module, autocast_adapter_dtype: bool):
        self.base_model = self.model = model
        self.prompt_encoder = nn.ModuleDict()
        self.off = False

    @staticmethod
    def takes(config) -> bool:
        return isinstance(config, PromptLearningConfig)

    def submodules(self) -> dict:
        return {"base_model": self.base_model, "prompt_encoder": self.prompt_encoder}

    def layers(self) -> list:
        return [m for _, m in base_modules(self.model) if isinstance(m, ModulesToSaveWrapper)]

    def add(self, name: str, config):
        config = prompts.resolve_config(self.model, config)
        to_save, wrapped = find_modules_to_save(self.model, config), {}
        encoder = prompts.build_encoder(config, self.model.get_input_embeddings())
        try:
            add_copies(self.model, name, to_save, wrapped)
        except BaseException:
            roll_back(self.model, self.layers(), name, wrapped)
            raise
        self.prompt_encoder[name] = encoder
        return config

    def delete(self, name: str) -> None:
        del self.prompt_encoder[name]
        for m in self.layers():
            m.delete_adapter(name)

    def check_active(self, names: list) -> None:
        if len(names) > 1:
            raise ValueError(f"soft prompts are active one at a time, got {names}")

    def sync(self, active: list, trainable: set, configs: dict) -> None:
        self.model.requires_grad_(False)
        activate(self.layers(), active, trainable)
        for adapter, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(adapter in trainable)

    def _prompt(self, active: list, configs: dict, adapter_names):
        if adapter_names is not None:
            raise ValueError("adapter_names (mixed-adapter batches) works with LoRA adapters, not soft prompts")
        return None if self.off else (configs[active[0]], self.prompt_encoder[active[0]])

    def forward(self, active: list, configs: dict, args, kwargs, adapter_names):
        """With a soft prompt, input_ids may be positional; everything else goes by keyword."""
        prompt = self._prompt(active, configs, adapter_names)
        if prompt is None:
            return self.model(*args, **kwargs)
        if len(args) > 1:
            raise TypeError("with soft prompts pass only input_ids positionally, the rest by keyword")
        config, encoder = prompt
        kwargs.update(zip(["input_ids"], args))
        return self.model(**prompts.prompt_inputs(self.model, config, encoder(), kwargs))

    def generate(self, active: list, configs: dict, args, kwargs, adapter_names):
        """The prompt goes in at prefill and the output holds only real tokens."""
        prompt = self._prompt(active, configs, adapter_names)
        if prompt is None:
            return self.model.generate(*args, **kwargs)
        return prompts.PromptedGeneration(self.model, *prompt).generate(*args, **kwargs)

    @contextmanager
    def disabled(self):
        was_off, self.off = self.off, True
        try:
            with layers_disabled(self.layers()):
                yield
        finally:
            self.off = was_off

    def tensors(self, name: str, config) -> dict:
        """The encoder's output and the module copies: what PEFT saves (docs/formats.md D.2, D.4, E.2, F)."""
        copies = {io.PROMPT_COPY_PREFIX + k: t for k, t in io.copy_tensors(self.model, name).items()}
        return {io.PROMPT_KEY: self.prompt_encoder[name](), **copies}

    @staticmethod
    def expected_shapes(model: nn.Module, config, is_trainable: bool) -> dict:
        if is_trainable:
            raise ValueError("soft prompts load for inference only (is_trainable=False), as in PEFT: the file "
                             "holds the prompt, not the encoder that was trained to produce it")
        config = prompts.resolve_config(model, config)
        copies = io.copy_shapes(model, find_modules_to_save(model, config))
        return {io.PROMPT_KEY: prompts.prompt_shape(config), **{io.PROMPT_COPY_PREFIX + k: v for k, v in copies.items()}}

    def merge(self, adapter_names) -> None:
        raise ValueError("soft prompts cannot be merged into the weights")

    def unmerge(self) -> None:
        pass  # nothing is ever merged

    def unload(self, active: list, keep_copies: bool) -> nn.Module:
        return unload_layers(self.model, active, keep_copies)

    def weighted_config(self, configs: list, combination_type: str):
        raise ValueError("add_weighted_adapter combines LoRA adapters, not soft prompts")


METHODS = (LoraMethod, SoftPromptMethod)


def method_for(config):
    """The method family class that runs adapters of `config`."""
    return next(m for m in METHODS if m.takes(config))
