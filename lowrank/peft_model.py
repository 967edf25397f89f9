"""get_peft_model and PeftModel: LoRA layers injected by module name, or soft prompts (lowrank.prompts) put
into the model's inputs; the rest frozen; many adapters of one kind.

Names follow PEFT so that code and state dicts carry over. With LoRA, `PeftModel.base_model.model` is the
wrapped model, parameters read `base_model.model.<HF path>.lora_A.<adapter>.weight`, and a module in
`modules_to_save` becomes `<path>.original_module` + `<path>.modules_to_save.<adapter>`. With soft prompts,
`PeftModel.base_model` is the model itself and the prompt encoders are `prompt_encoder.<adapter>.*`.
"""
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import io, prompts
from .checks import is_count, is_number
from .config import PromptLearningConfig
from .errors import CheckpointError
from .files import checked_name
from .lora import BASE, LoraLayer, ModulesToSaveWrapper, base_modules, combine_adapters
from .targets import find_modules_to_save, resolve_config


class LoraModel(nn.Module):
    """Holds the wrapped model as `.model`, so parameter names read `base_model.model.<path>` as in PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with LoRA adapters or soft prompts. forward/generate take the base model's arguments (and
    return what it returns), plus, with LoRA, `adapter_names` (one per row; "__base__" for none) to mix
    adapters in a batch. Attributes the wrapper lacks (config, prefill, decode_step, ...) are the base model's."""

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        if isinstance(peft_config, PromptLearningConfig):
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
        else:
            self.base_model = LoraModel(model)
        self.peft_config: dict = {}
        self._prompt_disabled = False
        self._active = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.add_adapter(adapter_name, peft_config)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
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
        return self.base_model.model if isinstance(self.base_model, LoraModel) else self.base_model

    @property
    def _soft_prompts(self) -> bool:
        return "prompt_encoder" in self._modules

    def _adapter_modules(self) -> list:
        return [m for _, m in base_modules(self.get_base_model()) if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]

    # -- running --

    def forward(self, *args, adapter_names=None, **kwargs):
        """With a soft prompt, input_ids may be positional; everything else goes by keyword."""
        prompt = self._active_prompt(adapter_names)
        if prompt is not None:
            if len(args) > 1:
                raise TypeError("with soft prompts pass only input_ids positionally, the rest by keyword")
            config, encoder = prompt
            kwargs.update(zip(["input_ids"], args))
            return self.base_model(**prompts.prompt_inputs(self.base_model, config, encoder(), kwargs))
        with self._rows(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """The base model's generate; with adapter_names every decode step keeps each row's adapter; with a
        soft prompt the prompt goes in at prefill and the output holds only real tokens."""
        prompt = self._active_prompt(adapter_names)
        if prompt is not None:
            return prompts.PromptedGeneration(self.base_model, *prompt).generate(*args, **kwargs)
        with self._rows(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    def _active_prompt(self, adapter_names):
        """(config, prompt encoder) of the active soft prompt, or None with LoRA or inside disable_adapter()."""
        if not self._soft_prompts or self._prompt_disabled:
            return None
        if adapter_names is not None:
            raise ValueError("adapter_names (mixed-adapter batches) works with LoRA adapters, not soft prompts")
        name = self._active[0]
        return self.peft_config[name], self.prompt_encoder[name]

    @contextmanager
    def _rows(self, adapter_names):
        """Route row i of every adapter layer's input through adapter_names[i] for the duration."""
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {sorted(self.peft_config)} and {BASE!r}")
        layers = self._adapter_modules()
        if any(getattr(m, "merged_adapters", None) for m in layers):
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        for m in layers:
            m.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            for m in layers:
                m.row_adapters = None

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first)."""
        layers = self._adapter_modules()
        was_disabled = [m.disable_adapters for m in layers]
        prompt_was_disabled = self._prompt_disabled
        for m in layers:
            m.enable_adapters(False)
        self._prompt_disabled = True
        try:
            yield
        finally:
            for m, disabled in zip(layers, was_disabled):
                m.enable_adapters(not disabled)
            self._prompt_disabled = prompt_was_disabled

    # -- adapters --

    def add_adapter(self, adapter_name: str, peft_config) -> None:
        """Add a new adapter (inactive unless it is the first): LoRA layers, or a soft prompt's encoder.
        Everything is checked before the model changes."""
        checked_name(adapter_name, "adapter name")
        if adapter_name in self.peft_config or adapter_name == BASE:
            raise ValueError(f"adapter name {adapter_name!r} is taken")
        if isinstance(peft_config, PromptLearningConfig) != self._soft_prompts:
            have = "soft prompts" if self._soft_prompts else "LoRA adapters"
            raise ValueError(f"cannot add a {peft_config.peft_type} adapter to a model with {have}")
        if self._soft_prompts:
            config = prompts.resolve_config(self.base_model, peft_config)
            self.prompt_encoder[adapter_name] = prompts.build_encoder(config, self.base_model.get_input_embeddings())
            self.peft_config[adapter_name] = config
            self._sync()
            return
        model = self.base_model.model
        config, plan = resolve_config(model, peft_config)
        to_save = find_modules_to_save(model, config)
        for path, (r, alpha) in plan.items():
            layer = model.get_submodule(path)
            if not isinstance(layer, LoraLayer):
                layer = LoraLayer(layer)
                model.set_submodule(path, layer)
            weight_dtype = layer.base_layer.weight.dtype
            upcast = self.autocast_adapter_dtype and weight_dtype in (torch.float16, torch.bfloat16)
            layer.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                               config.use_rslora, dtype=torch.float32 if upcast else weight_dtype)
        for path in to_save:
            wrapper = model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                model.set_submodule(path, wrapper)
            wrapper.update(adapter_name)
        self.peft_config[adapter_name] = config
        self._sync()

    def set_adapter(self, adapter_name) -> None:
        """Make one adapter, or a list of adapters that add up, active (and trainable unless loaded for
        inference). Merged adapters are unmerged first, as PEFT does."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        if self._soft_prompts and len(names) > 1:
            raise ValueError(f"soft prompts are active one at a time, got {names}")
        if any(getattr(m, "merged_adapters", None) for m in self._adapter_modules()):
            warnings.warn("unmerging the merged adapters before switching", stacklevel=2)
            self.unmerge_adapter()
        self._active = names
        self._sync()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names([adapter_name])
        layers = self._adapter_modules()
        if any(adapter_name in getattr(m, "merged_adapters", ()) for m in layers):
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        for m in layers:
            m.delete_adapter(adapter_name)
        if self._soft_prompts:
            del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name] or list(self.peft_config)[:1]
        self._sync()

    def _check_names(self, names) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this model has {sorted(self.peft_config)}")

    def _sync(self) -> None:
        """Push the active adapters to every layer and set requires_grad: the active adapters' LoRA factors,
        module copies and selected biases, or prompt encoder, train (unless loaded for inference); everything
        else is frozen."""
        model = self.get_base_model()
        trainable = {a for a in self._active if not self.peft_config[a].inference_mode}
        bias_params = {}
        for a in trainable if not self._soft_prompts else ():
            paths = {n for n, m in base_modules(model) if isinstance(m, LoraLayer) and a in m.lora_A}
            bias_params.update(io.layer_biases(model, paths, self.peft_config[a].bias))
        model.requires_grad_(False)
        for adapter, encoder in (self.prompt_encoder.items() if self._soft_prompts else ()):
            encoder.requires_grad_(adapter in trainable)
        for m in self._adapter_modules():
            m.active_adapters = list(self._active)
            for table in [m.modules_to_save] if isinstance(m, ModulesToSaveWrapper) else [m.lora_A, m.lora_B]:
                for adapter, module in table.items():
                    module.requires_grad_(adapter in trainable)
        for p in bias_params.values():
            p.requires_grad_(True)

    # -- merging --

    def merge_adapter(self, adapter_names=None) -> None:
        """Fold adapters (default: the active ones) into the base weights."""
        if self._soft_prompts:
            raise ValueError("soft prompts cannot be merged into the weights")
        if adapter_names is not None:
            self._check_names(adapter_names)
        for m in self._adapter_modules():
            if isinstance(m, LoraLayer):
                m.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        for m in self._adapter_modules():
            if isinstance(m, LoraLayer):
                m.unmerge()

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
        model = self.get_base_model()
        for path, m in list(base_modules(model)):
            if isinstance(m, LoraLayer):
                model.set_submodule(path, m.base_layer)
            elif isinstance(m, ModulesToSaveWrapper):
                active = next((a for a in self._active if a in m.modules_to_save), None)
                model.set_submodule(path, m.module_for(active) if keep_copies else m.original_module)
        self.peft_config.clear()
        self._active = []
        return model

    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "svd",
                             svd_rank=None) -> None:
        """A new adapter mixing `adapters` with `weights` (see lora.combine_adapters): "cat" (rank = sum of
        ranks, exact), "svd" (rank svd_rank, default the largest rank; exact at full rank) or "linear"
        (equal ranks, PEFT's approximation). The new adapter has lora_alpha = r, so scaling 1."""
        if self._soft_prompts:
            raise ValueError("add_weighted_adapter combines LoRA adapters, not soft prompts")
        self._check_names(adapters)
        if len(weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        if not all(is_number(w) for w in weights):
            raise ValueError(f"weights={list(weights)!r} must be finite numbers")
        if svd_rank is not None and not is_count(svd_rank):
            raise ValueError(f"svd_rank={svd_rank!r} must be None (the largest rank) or an integer >= 1")
        if combination_type not in ("svd", "linear", "cat"):
            raise ValueError(f"combination_type={combination_type!r} must be 'svd', 'linear' or 'cat'")
        configs = [self.peft_config[a] for a in adapters]
        combination_type = "linear" if len(adapters) == 1 else combination_type
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
        if combination_type == "linear" and len(set(ranks)) > 1:
            raise ValueError(f"combination_type='linear' needs equal ranks; {adapters} have {ranks}")
        rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
        kinds = {isinstance(c.target_modules, str) for c in configs}
        if len(kinds) > 1:
            raise ValueError("cannot combine adapters whose target_modules mix regex strings and lists")
        targets = ("|".join(f"({c.target_modules})" for c in configs) if kinds == {True}
                   else list(dict.fromkeys(t for c in configs for t in c.target_modules)))
        self.add_adapter(adapter_name, replace(configs[0], r=rank, lora_alpha=rank, target_modules=targets,
                                               rank_pattern={}, alpha_pattern={}, use_rslora=False))
        for m in self._adapter_modules():
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
                A, B = combine_adapters(m, adapters, weights, combination_type, rank)
                with torch.no_grad():
                    m.lora_A[adapter_name].weight.copy_(A)
                    m.lora_B[adapter_name].weight.copy_(B)

    # -- counting --

    def get_nb_trainable_parameters(self) -> tuple:
        """(trainable, all) parameter counts, each shared parameter counted once (PEFT's numbers)."""
        counts = [(p.numel(), p.requires_grad) for p in self.parameters()]
        return sum(n for n, t in counts if t), sum(n for n, _ in counts)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- files (FORMATS C) --

    def adapter_tensors(self, adapter_name: str) -> dict:
        """{file key: tensor} of what adapter_model.safetensors holds for this adapter (FORMATS C.2; a soft
        prompt: its encoder's output, FORMATS D.2, E.2, F). Live parameters where the file holds parameters."""
        if self._soft_prompts:
            return {io.PROMPT_KEY: self.prompt_encoder[adapter_name]()}
        return io.adapter_tensors(self.base_model.model, adapter_name, self.peft_config[adapter_name].bias)

    def save_pretrained(self, save_directory, selected_adapters=None) -> None:
        """adapter_config.json + adapter_model.safetensors per adapter, PEFT's format; adapters other than
        "default" go into a subfolder named after them. Each adapter's two files are written as one change of
        its folder (files.write_folder)."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_names(names)
        for name in names:  # names were checked when the adapters were added: each stays inside save_directory
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = replace(self.peft_config[name], inference_mode=True)
            io.write_adapter(folder, config.to_dict(), self.adapter_tensors(name))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        autocast_adapter_dtype: bool = True) -> "PeftModel":
        """Wrap `model` with the adapter saved at `model_id`; the file is checked in full first."""
        config, tensors = _read_checked(model, model_id, is_trainable)
        peft = cls(model, config, adapter_name, autocast_adapter_dtype)
        peft._copy_in(adapter_name, tensors)
        return peft

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved at `model_id` under `adapter_name` (not activated, as in PEFT)."""
        checked_name(adapter_name, "adapter name")
        config, tensors = _read_checked(self.get_base_model(), model_id, is_trainable)
        self.add_adapter(adapter_name, config)
        self._copy_in(adapter_name, tensors)

    @torch.no_grad()
    def _copy_in(self, adapter_name: str, tensors: dict) -> None:
        live = self.adapter_tensors(adapter_name)
        assert live.keys() == tensors.keys(), sorted(live.keys() ^ tensors.keys())
        for key, tensor in tensors.items():
            live[key].copy_(tensor)


def _read_checked(model: nn.Module, model_id, is_trainable: bool) -> tuple:
    """(config, tensors by expected key) of a saved adapter, checked against `model` before it is touched."""
    config, tensors, config_file, weights_file = io.read_adapter(model_id)
    config = replace(config, inference_mode=not is_trainable)
    try:
        if isinstance(config, PromptLearningConfig):
            if is_trainable:
                raise ValueError("soft prompts load for inference only (is_trainable=False), as in PEFT: the file "
                                 "holds the prompt, not the encoder that was trained to produce it")
            expected = {io.PROMPT_KEY: prompts.prompt_shape(prompts.resolve_config(model, config))}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fan_in_fan_out correction is announced when the adapter is added
                resolved, plan = resolve_config(model, config)
            expected = io.expected_shapes(model, plan, find_modules_to_save(model, resolved), resolved.bias)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return config, io.match_tensors(tensors, expected, weights_file)


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """Wrap `model`: LoRA on the targeted modules and trainable copies of modules_to_save (a LoraConfig), or a
    trainable soft prompt (a PromptTuningConfig, PrefixTuningConfig or PromptEncoderConfig); everything else
    frozen.

    autocast_adapter_dtype: adapters of fp16/bf16 layers are kept in fp32 (PEFT's default; such layers
    then run the unfused two-path forward); False keeps them in the layer's dtype (one fused kernel).
    """
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)
