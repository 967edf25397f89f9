"""PEFT method configs (LoRA, docs/formats.md C; soft prompts, docs/formats.md D-F): dataclasses with PEFT's field names and
defaults, and their JSON round trip.

`PeftConfig` holds what every method shares; each method adds its fields and fixes `peft_type`.
`config_from_dict` reads an adapter_config.json dict, dispatching on its `peft_type` (docs/formats.md C.1).
The matching rules that decide which modules a config touches live here too (docs/formats.md C.3, C.5),
as pure functions of a module name.
"""
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar, Optional, Union

from .checks import check_types, is_count, is_number
from .errors import ConfigError

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
CLASSIFIER_HEADS = ("classifier", "score")  # what PEFT trains in full for SEQ_CLS
ENCODER_DECODER_TASKS = {"CAUSAL_LM": False, "SEQ_2_SEQ_LM": True}  # task_type -> whether its model is one


def is_encoder_decoder(model) -> bool:
    """Whether the model's config says it has an encoder and a decoder (T5), as transformers' configs do."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _name_matches(names, name: str) -> bool:
    """PEFT's list rule: the module name equals an entry or ends with '.' + entry."""
    return any(name == n or name.endswith("." + n) for n in names)


def _check_regex(owner: str, field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{owner}: {field_name}={pattern!r} is not a valid regular expression: {e}") from None


def _as_names(owner: str, field_name: str, value):
    """None, a regex string, or a list/tuple/set of names -> None, the string, or a list without repeats."""
    if value is None:
        return None
    if isinstance(value, str):
        _check_regex(owner, field_name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return list(dict.fromkeys(sorted(value) if isinstance(value, (set, frozenset)) else value))
    raise ConfigError(f"{owner}: {field_name}={value!r} must be None, a regex string or a list of module names")


def _check_int(owner: str, field_name: str, value, minimum: int) -> None:
    if not is_count(value, minimum):
        raise ConfigError(f"{owner}: {field_name}={value!r} must be an integer >= {minimum}")


@dataclass(kw_only=True)
class PeftConfig:
    """Fields every PEFT method shares. Subclasses set `peft_type` and add their own fields.

    Unknown keys in a loaded file are warned about and dropped; keys PEFT writes that we do not model
    are listed per class in `peft_ignored` (harmless whatever their value) and `peft_unsupported`
    (name -> the only value we can honour: anything else changes the math, so loading refuses it).
    """

    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    modules_to_save: Optional[list] = None

    peft_type: ClassVar[str] = ""
    peft_ignored: ClassVar[frozenset] = frozenset({"peft_version", "auto_mapping"})
    peft_unsupported: ClassVar[dict] = {}

    def __post_init__(self):
        check_types(self)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"{type(self).__name__}: task_type={self.task_type!r} is not one of {TASK_TYPES}")
        if isinstance(self.modules_to_save, str):
            raise ConfigError(f"{type(self).__name__}: modules_to_save={self.modules_to_save!r} must be a list of names")
        self.modules_to_save = _as_names(type(self).__name__, "modules_to_save", self.modules_to_save)

    def with_task_modules(self) -> "PeftConfig":
        """For task_type SEQ_CLS, this config with the classification heads added to modules_to_save, as
        PEFT's PeftModelForSequenceClassification adds them (the head trains in full and is saved)."""
        if self.task_type != "SEQ_CLS":
            return self
        return replace(self, modules_to_save=list(dict.fromkeys([*(self.modules_to_save or []), *CLASSIFIER_HEADS])))

    def is_module_to_save(self, name: str) -> bool:
        """True for a module that gets a trainable copy: PEFT's rule, a plain suffix of the name (so "norm"
        takes `input_layernorm` too, as peft's _set_trainable does)."""
        return bool(self.modules_to_save) and any(name.endswith(m) for m in self.modules_to_save)

    def to_dict(self) -> dict:
        """JSON-ready adapter_config.json content: every field, plus peft_type."""
        return {**asdict(self), "peft_type": self.peft_type}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "PeftConfig":
        """Inverse of to_dict. Unknown keys warn, naming `source` and the keys, and are dropped; a PEFT
        feature this library does not implement, switched on, raises ValueError naming the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("peft_type", cls.peft_type) != cls.peft_type:
            raise ConfigError(f"peft_type={d['peft_type']!r}, expected {cls.peft_type!r}")
        names = {f.name for f in fields(cls)}
        for key, default in cls.peft_unsupported.items():
            if d.get(key, default) != default:
                raise ConfigError(f"{key}={d[key]!r} is not supported by lowrank (only {default!r})")
        unknown = sorted(set(d) - names - cls.peft_ignored - set(cls.peft_unsupported) - {"peft_type"})
        if unknown:
            warnings.warn(f"{source}: ignoring unknown {cls.__name__} fields {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(kw_only=True)
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021): y = base(x) + scaling * lora_B(lora_A(dropout(x))), docs/formats.md C.

    r, lora_alpha: rank and numerator of scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
    target_modules: list of module-name suffixes, a regex (re.fullmatch on the full name), "all-linear"
        (every linear but the output head), or None for the model type's default (docs/formats.md C.4).
    exclude_modules: same forms as target_modules; matching modules are never targeted.
    fan_in_fan_out: weight stored (in, out) as GPT-2's Conv1D; set from the target's class when injecting.
    bias: "none", "all" (every bias trains) or "lora_only" (biases of targeted layers train).
    init_lora_weights: True (kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B) or False
        (nn.Linear's init for both, so B != 0: for tests).
    layers_to_transform, layers_pattern: restrict list targets to these layer indices (the first
        '<layers_pattern>.<i>.' in the name; any '<name>.<i>.' when no pattern is given).
    rank_pattern, alpha_pattern: per-module r / lora_alpha; the first key k with
        re.match(rf"(.*\\.)?({k})$", module_name) wins.
    """

    r: int = 8
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    peft_type: ClassVar[str] = "LORA"
    peft_ignored: ClassVar[frozenset] = PeftConfig.peft_ignored | {
        "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
        "qalora_group_size", "ensure_weight_tying", "runtime_config",
    }
    peft_unsupported: ClassVar[dict] = {
        "use_dora": False, "lora_bias": False, "use_qalora": False, "layer_replication": None,
        "target_parameters": None, "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None,
        "velora_config": None, "monteclora_config": None, "kasa_config": None, "trainable_token_indices": None,
    }

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        _check_int(name, "r", self.r, 1)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{name}: lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"{name}: bias={self.bias!r} must be 'none', 'all' or 'lora_only'")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"{name}: init_lora_weights={self.init_lora_weights!r} must be True, False or 'gaussian'")
        self.target_modules = _as_names(name, "target_modules", self.target_modules)
        self.exclude_modules = _as_names(name, "exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"{name}: layers_to_transform={self.layers_to_transform!r} needs target_modules as a "
                             f"list, got the regex {self.target_modules!r}")
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        if not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"{name}: layers_pattern={self.layers_pattern!r} must be a name or a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{name}: layers_pattern={self.layers_pattern!r} needs layers_to_transform")
        layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if layers is not None and not all(is_count(i, 0) for i in layers):
            raise ConfigError(f"{name}: layers_to_transform={self.layers_to_transform!r} must be ints >= 0")
        for field_name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            for key, value in getattr(self, field_name).items():
                if not isinstance(key, str):
                    raise ConfigError(f"{name}: {field_name} key {key!r} must be a string (a module-name regex)")
                _check_regex(name, f"{field_name} key", key)
                if not (is_count(value) if kind is int else is_number(value)) or value < 1:
                    raise ConfigError(f"{name}: {field_name}[{key!r}]={value!r} must be a number >= 1"
                                     + (" (an integer)" if kind is int else ""))

    def is_target(self, name: str) -> bool:
        """Whether the module called `name` (path in the wrapped model) gets LoRA (docs/formats.md C.5)."""
        if self.exclude_modules is not None and (
            re.fullmatch(self.exclude_modules, name) if isinstance(self.exclude_modules, str)
            else _name_matches(self.exclude_modules, name)
        ):
            return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        if not _name_matches(self.target_modules or (), name):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
        # lazy .*?: the first numbered segment is the layer index, not a nested index further in
        regexes = [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns] if patterns else [r".*?\.[^.]*\.(\d+)\."]
        match = next((m for m in (re.match(rx, name) for rx in regexes) if m), None)
        if match is None:
            return False
        layers = self.layers_to_transform
        return int(match.group(1)) == layers if isinstance(layers, int) else int(match.group(1)) in layers

    def rank_and_alpha(self, name: str) -> tuple:
        """(r, lora_alpha) for the module called `name`, after rank_pattern / alpha_pattern (docs/formats.md C.3)."""
        return _pattern_value(self.rank_pattern, name, self.r), _pattern_value(self.alpha_pattern, name, self.lora_alpha)


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(kw_only=True)
class PromptLearningConfig(PeftConfig):
    """Fields every soft-prompt method shares (docs/formats.md D.1). Those left None are filled from the model's
    config when the adapter is added (lowrank.prompts.resolve_config).

    num_virtual_tokens: N, the prompt length (required, >= 1).
    token_dim: the model's hidden size; num_layers, num_attention_heads: the model's layer and head counts.
    num_transformer_submodules: 2 for SEQ_2_SEQ_LM (the saved prompt has 2N rows), else 1.
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        _check_int(name, "num_virtual_tokens", self.num_virtual_tokens, 1)
        for field_name in ("token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, field_name) is not None:
                _check_int(name, field_name, getattr(self, field_name), 1)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"{name}: num_transformer_submodules={self.num_transformer_submodules!r} must be 1 or 2")


@dataclass(kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): N learned embeddings prepended to the input embeddings (docs/formats.md D).

    prompt_tuning_init: "RANDOM" (N(0, 1)), "TEXT" (the model's embeddings of prompt_tuning_init_text,
        tokenised by tokenizer_name_or_path/tokenizer.json, repeated or cut to N rows per submodule) or
        "SAMPLE_VOCAB" (embeddings of random vocabulary tokens).
    tokenizer_kwargs: PEFT passes them to AutoTokenizer; models.load_tokenizer takes none, so only
        None or {} can be honoured.
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ConfigError(f"{name}: prompt_tuning_init={self.prompt_tuning_init!r} must be 'RANDOM', 'TEXT' "
                             f"or 'SAMPLE_VOCAB'")
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError(f"{name}: tokenizer_name_or_path={self.tokenizer_name_or_path!r}, but "
                                 f"prompt_tuning_init='TEXT' needs a folder with tokenizer.json")
            if not self.prompt_tuning_init_text:
                raise ConfigError(f"{name}: prompt_tuning_init_text={self.prompt_tuning_init_text!r}, but "
                                 f"prompt_tuning_init='TEXT' needs a non-empty text (a zero-length prompt)")
        elif self.tokenizer_kwargs:
            raise ConfigError(f"{name}: tokenizer_kwargs={self.tokenizer_kwargs!r} is only valid with "
                             f"prompt_tuning_init='TEXT'")


@dataclass(kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021): N learned keys and values per layer, before the tokens' own (docs/formats.md E).

    prefix_projection: train an embedding (N, token_dim) through Linear(token_dim, encoder_hidden_size),
        Tanh, Linear(encoder_hidden_size, 2 num_layers token_dim); files hold only the projected prefix.
    encoder_hidden_size: None means token_dim.
    init_weights: None (nn.Embedding / nn.Linear init) or "zero" (the prefix, or the last Linear, starts at 0).
    """

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"{name}: init_weights={self.init_weights!r} must be None or 'zero'")
        if self.encoder_hidden_size is not None:
            _check_int(name, "encoder_hidden_size", self.encoder_hidden_size, 1)


@dataclass(kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021): prompt rows produced by an MLP or a bidirectional LSTM + MLP from a learned
    embedding (docs/formats.md F); files hold only the encoder's output.

    encoder_hidden_size: the heads' width (None means token_dim); encoder_num_layers: LSTM layers (the MLP
    always has three Linear layers); encoder_dropout: between LSTM layers.
    """

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    peft_type: ClassVar[str] = "P_TUNING"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ConfigError(f"{name}: encoder_reparameterization_type={self.encoder_reparameterization_type!r} "
                             f"must be 'MLP' or 'LSTM'")
        if self.encoder_hidden_size is not None:
            _check_int(name, "encoder_hidden_size", self.encoder_hidden_size, 1)
        _check_int(name, "encoder_num_layers", self.encoder_num_layers, 1)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"{name}: encoder_dropout={self.encoder_dropout!r} must be in [0, 1)")


CONFIG_CLASSES = {cls.peft_type: cls for cls in (LoraConfig, PromptTuningConfig, PrefixTuningConfig,
                                                 PromptEncoderConfig)}


def config_from_dict(d: dict, source: str = "config") -> PeftConfig:
    """An adapter_config.json dict -> the config class its `peft_type` names; `source` names it in warnings."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    peft_type = d.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in CONFIG_CLASSES:
        raise ConfigError(f"peft_type={peft_type!r} is not one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[peft_type].from_dict(d, source)
