"""Checkpoints in and out: config.json + model.safetensors (or shards), never pickle.

A model class provides four hooks: `config_class` (a models.config.ModelConfig), `checkpoint_layers`
({config field: regex of a file key's layer index}, checked before anything is built),
`normalize_checkpoint(tensors, config) -> state dict` (file keys -> its own keys) and
`checkpoint_state_dict()` (what to write). Everything is validated before the model is built,
so a failed load leaves nothing half-loaded.
"""
import contextlib
import importlib
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..files import finish_interrupted_write, inside, read_json_object, write_folder
from .config import dtype_named

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# model_type -> (module, {PEFT task_type: class}); the first class is what a config without a known
# `architectures` entry loads as.
MODEL_TYPES = {
    "gpt2": ("gpt2", {"CAUSAL_LM": "GPT2LMHeadModel", "SEQ_CLS": "GPT2ForSequenceClassification"}),
    "t5": ("t5", {"SEQ_2_SEQ_LM": "T5ForConditionalGeneration"}),
    "gpt_neo": ("gpt_neo", {"CAUSAL_LM": "GPTNeoForCausalLM", "SEQ_CLS": "GPTNeoForSequenceClassification"}),
    "bloom": ("bloom", {"CAUSAL_LM": "BloomForCausalLM", "SEQ_CLS": "BloomForSequenceClassification"}),
    "llama": ("llama", {"CAUSAL_LM": "LlamaForCausalLM"}),
    "qwen2": ("llama", {"CAUSAL_LM": "Qwen2ForCausalLM"}),
    "mistral": ("llama", {"CAUSAL_LM": "MistralForCausalLM"}),
}


def written_architecture(raw: dict):
    """The class config.json's `architectures` names first, or None."""
    architectures = raw.get("architectures")
    named = architectures[0] if isinstance(architectures, list) and architectures else None
    return named if isinstance(named, str) else None


def model_class(raw: dict, source, task_type=None):
    """The class config.json asks for: its model_type's class for task_type (PEFT's names: "CAUSAL_LM",
    "SEQ_CLS", ...), else the one its `architectures` names, else the model type's first (a headless
    `GPT2Model` checkpoint loads as the LM). Imported only when asked for."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: unknown model_type {model_type!r}; supported: {sorted(MODEL_TYPES)}")
    module, classes = MODEL_TYPES[model_type]
    if task_type is not None and task_type not in classes:
        raise ValueError(f"task_type={task_type!r}: a {model_type} model loads as one of {sorted(classes)}")
    named = written_architecture(raw)
    name = classes[task_type] if task_type else named if named in classes.values() else next(iter(classes.values()))
    return getattr(importlib.import_module(f".{module}", __package__), name)


def read_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json in {path}")
    return read_json_object(file)


def _read_safetensors(file: Path, keys=None) -> dict:
    """Tensors of one file, read through safetensors' memory map; keys: only these, each must be present."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: checkpoint file not found")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            present = set(f.keys())
            absent = sorted(set(keys or ()) - present)
            if absent:
                raise CheckpointError(f"{file}: keys listed in the shard index are absent: {absent[:5]}")
            return {k: f.get_tensor(k) for k in (keys if keys is not None else present)}
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def shard_keys(index: Path) -> dict:
    """{shard file: [its keys]} of a model.safetensors.index.json; CheckpointError naming the index for a
    missing weight_map or a shard name that is not a plain file name in the index's folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
    shards = {}
    for key, shard in weight_map.items():
        shards.setdefault(inside(index.parent, shard, f"{index}: weight_map[{key!r}]"), []).append(key)
    return shards


def read_checkpoint(path: Path):
    """(tensors by file key, the file they came from: model.safetensors or the shard index)."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        return _read_safetensors(single), single
    if index.is_file():
        tensors = {}
        for shard, keys in shard_keys(index).items():
            tensors.update(_read_safetensors(shard, keys))
        return tensors, index
    pickles = [name for name in PICKLE_NAMES if (path / name).is_file()]
    if pickles:
        raise CheckpointError(
            f"{path / pickles[0]}: pickle checkpoints are refused (loading one can run arbitrary code). "
            f"Convert once, where you trust the file: transformers.AutoModelForCausalLM (or "
            f"AutoModelForSeq2SeqLM for T5).from_pretrained(path).save_pretrained(path) writes {WEIGHTS_NAME}."
        )
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def check_layer_count(cls, config, tensors: dict, source) -> None:
    """The checkpoint holds layers 0..n-1 for each config field cls.checkpoint_layers names ({field: regex
    whose group 1 is the layer index in a file key}); checked before the model is built, so a config.json
    asking for a million layers fails at once instead of building them."""
    for name, pattern in cls.checkpoint_layers.items():
        found = {int(m.group(1)) for key in tensors if (m := re.match(pattern, key))}
        expected = getattr(config, name)
        if len(found) != expected or found != set(range(expected)):
            held = f"layers {min(found)}..{max(found)} ({len(found)} distinct)" if found else "no layers"
            raise CheckpointError(f"{source}: config.json says {name}={expected}, the file holds {held} "
                                  f"(keys matching {pattern!r})")


def validate_state_dict(state: dict, expected: dict, source, cast: bool = False) -> None:
    """Every expected key present with its shape and a float dtype, nothing else; else one ValueError listing all."""
    problems = [f"missing key {k!r} (shape {tuple(expected[k].shape)})" for k in expected if k not in state]
    problems += [f"unexpected key {k!r} (shape {tuple(state[k].shape)})" for k in state if k not in expected]
    for k in state.keys() & expected.keys():
        if state[k].shape != expected[k].shape:
            problems.append(f"key {k!r} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
        elif not state[k].is_floating_point():
            problems.append(f"key {k!r} has dtype {state[k].dtype}, expected a floating-point dtype")
    dtypes = {}  # a forward needs one dtype, unless the load casts them (cast)
    for k, t in state.items() if not cast else ():
        dtypes.setdefault(t.dtype, k)
    if len(dtypes) > 1:
        problems.append(f"tensors of several dtypes ({', '.join(f'{k!r} is {d}' for d, k in dtypes.items())}); "
                        f"pass dtype= to load them as one")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source}: checkpoint does not match the model:\n  {shown}")


def resolve_dtype(dtype):
    """None (keep the file's dtypes), a torch floating dtype, or its name ("bfloat16"); ValueError naming
    anything else ("float33", torch.int8)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    return dtype_named(dtype, "dtype")


def resolve_device(device):
    """None or a torch.device (or its name); ValueError naming `device` for anything torch does not know."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device torch knows ({' '.join(str(e).split())[:120]})") from None


def _tied_names(model) -> list[list[str]]:
    """Groups of parameter names that share one Parameter (tied weights), as the model built them."""
    groups = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model, groups):
    for first, *others in groups:
        param = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


@contextlib.contextmanager
def _initialisers_skipped():
    """torch.nn.init functions as no-ops: on the meta device they only cost time (the first
    normal_ there imports torch._dynamo, seconds)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _other_head_dropped(cls, model, state: dict, source, architecture) -> list:
    """A checkpoint of another head (a causal LM loaded for SEQ_CLS, as AutoModelForSequenceClassification
    does): drop what the model has no place for, and name the head parameters it lacks, which are then
    initialised as the model initialises them (and warned about, as transformers does)."""
    expected = model.state_dict()
    unused = sorted(k for k in state if k not in expected)
    for k in unused:
        del state[k]
    new = [k for k in expected if k not in state and k.split(".", 1)[0] in getattr(cls, "head_names", ())]
    warnings.warn(f"{source}: a {architecture} checkpoint loaded as {cls.__name__}: {new} newly initialised "
                  f"(train them){f', {unused} unused' if unused else ''}", stacklevel=3)
    return new


def _initialise(model, names, dtype, device) -> None:
    """Parameters `names`, still on the meta device, made real and initialised by the model's _init_weights."""
    for module_name in sorted({name.rpartition(".")[0] for name in names}):
        module = model.get_submodule(module_name)
        module.to_empty(device=device or "cpu", recurse=False)
        module.to(dtype)
        model._init_weights(module)


def from_pretrained(path, dtype=None, device=None, task_type=None, num_labels=None):
    """Load a model folder (config.json + safetensors) written by transformers or save_pretrained.

    dtype: None keeps the file's dtypes, else a float dtype or its name; device: where the weights go.
    task_type: None (what config.json's `architectures` names) or PEFT's name of the head to load
    ("CAUSAL_LM", "SEQ_CLS"); a checkpoint of another head gets a newly initialised one, with a warning.
    num_labels: the classes of a SEQ_CLS head (default: the config's, 2 without id2label).
    The model is returned in eval mode, as transformers does.
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    if path.is_dir():
        finish_interrupted_write(path)
    raw = read_config(path)
    cls = model_class(raw, path / CONFIG_NAME, task_type)
    config = cls.config_class.from_dict(raw, source=path / CONFIG_NAME)
    if num_labels is not None:
        if "SequenceClassification" not in cls.__name__:
            raise ValueError(f"num_labels={num_labels!r} is for a SEQ_CLS head, not a {cls.__name__}")
        config = config.with_labels(num_labels)
    tensors, source = read_checkpoint(path)
    check_layer_count(cls, config, tensors, source)
    try:
        state = cls.normalize_checkpoint(tensors, config)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.device("meta"), _initialisers_skipped():
        model = cls(config)
    written_as = written_architecture(raw)
    new = []
    if task_type is not None and written_as != cls.__name__:
        new = _other_head_dropped(cls, model, state, source, written_as or raw.get("model_type"))
    validate_state_dict(state, {k: t for k, t in model.state_dict().items() if k not in new}, source,
                        cast=dtype is not None)
    converted = {}  # by tensor identity, so tied entries stay one tensor
    for k, t in state.items():
        if id(t) not in converted:
            converted[id(t)] = t.to(device=device, dtype=dtype)
        state[k] = converted[id(t)]
    tied = _tied_names(model)
    model.load_state_dict(state, assign=True, strict=not new)
    _retie(model, tied)
    _initialise(model, new, dtype or next(iter(state.values())).dtype, device)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"{cls.__name__}: tensors not covered by the state dict: {still_meta}")
    return model.eval()


def save_pretrained(model, path) -> None:
    """Write config.json and model.safetensors (metadata {"format": "pt"}) that transformers loads, as one
    change of the folder (lowrank.files.write_folder): a crash leaves the old pair or the new one."""
    path = Path(path)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in model.checkpoint_state_dict().items()}
    config = model.config.to_dict()
    config.pop("torch_dtype", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(next(t.dtype for t in tensors.values() if t.is_floating_point())).removeprefix("torch.")
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_folder(path, {WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                        CONFIG_NAME: lambda tmp: Path(tmp).write_text(text)})
