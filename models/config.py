"""The base of every model config: transformers' field names and config.json round trip, each field checked
when the config is made, so a bad config.json fails here, naming the file and the field, before any
tensor is built."""
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch

from ..checks import check_at_least, check_fraction, check_types
from ..errors import ConfigError

DTYPE_KEYS = ("dtype", "torch_dtype")  # what transformers writes for the weights' dtype


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
