"""The base of every model config: transformers' field names and config.json round trip, each field checked
when the config is made, so a bad config.json fails here, naming the file and the field, before any
tensor is built."""
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

import torch

from ..checks import check_at_least, check_fraction, check_types, is_count
from ..errors import ConfigError

DTYPE_KEYS = ("dtype", "torch_dtype")  # what transformers writes for the weights' dtype
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def dtype_named(name, source) -> torch.dtype:
    """The floating torch dtype called `name` ("bfloat16", "torch.float16"); ConfigError naming `source`."""
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"{source}={name!r} is not a floating-point torch dtype name "
                          f"(e.g. 'float32', 'bfloat16')")
    return dtype


@dataclass
class ModelConfig:
    """A subclass is a dataclass of transformers' fields with their defaults, ending with
    `extra: dict` (config.json keys it does not model, kept for the round trip), and names:

    model_type, architecture: what config.json says; sizes: fields that must be integers >= 1;
    rates: dropout probabilities, in [0, 1); positive: floats that must be > 0 (epsilons); non_negative:
    floats that must be >= 0 (init scales);
    derived: keys to_dict writes that from_dict recomputes (so they are not kept in `extra`).
    """

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    sizes: ClassVar[tuple] = ()
    rates: ClassVar[tuple] = ()
    positive: ClassVar[tuple] = ()
    non_negative: ClassVar[tuple] = ()
    derived: ClassVar[frozenset] = frozenset()

    def __post_init__(self):
        check_types(self)
        check_at_least(self, self.sizes, 1)
        check_fraction(self, self.rates)
        check_at_least(self, self.non_negative, 0)
        for name in self.positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{type(self).__name__}: {name}={getattr(self, name)!r} must be > 0")
        for key in DTYPE_KEYS:
            if self.extra.get(key) is not None:
                dtype_named(self.extra[key], f"{type(self).__name__}: {key}")
        self._check_labels()

    def _check_labels(self) -> None:
        """id2label, when given, names labels 0..n-1; problem_type is one of transformers' three."""
        name, id2label = type(self).__name__, self.extra.get("id2label")
        if id2label is not None and (not isinstance(id2label, dict) or not id2label
                                     or sorted(id2label, key=str) != sorted(map(str, range(len(id2label))))):
            raise ConfigError(f"{name}: id2label={id2label!r} must map the label ids 0..n-1 to names")
        if not is_count(self.extra.get("num_labels", 2)):
            raise ConfigError(f"{name}: num_labels={self.extra['num_labels']!r} must be an integer >= 1")
        if self.problem_type not in (None, *PROBLEM_TYPES):
            raise ConfigError(f"{name}: problem_type={self.problem_type!r} is not one of {PROBLEM_TYPES}")

    @property
    def num_labels(self) -> int:
        """The classes of a classification head: len(id2label), 2 without one (transformers' default)."""
        return len(self.extra["id2label"]) if self.extra.get("id2label") else self.extra.get("num_labels", 2)

    @property
    def problem_type(self):
        """None (chosen from num_labels and the labels' dtype) or one of PROBLEM_TYPES."""
        return self.extra.get("problem_type")

    def with_labels(self, num_labels: int):
        """This config with num_labels generic labels (LABEL_0..), as transformers' num_labels= writes them."""
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"num_labels={num_labels!r} must be an integer >= 1")
        if num_labels == self.num_labels:
            return self
        names = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        extra = {**self.extra, "id2label": names, "label2id": {v: int(k) for k, v in names.items()}}
        return replace(self, extra=extra)

    @classmethod
    def from_dict(cls, d, source="config"):
        """A config.json dict -> the config; ConfigError naming `source` for anything that is not valid."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in names and k not in cls.derived | {"model_type", "architectures"}}
        try:
            return cls(**{k: v for k, v in d.items() if k in names}, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def derived_fields(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        """config.json content that transformers loads as `architecture`."""
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d, **self.derived_fields(), "model_type": self.model_type,
                "architectures": [self.architecture]}
