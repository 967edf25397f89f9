"""Field checks every config dataclass runs in __post_init__: each value has the type its annotation names
(`True` is not an integer, `"false"` is not a boolean, `"abc"` is not a number), numbers are finite, sizes
are >= 1. ConfigError names the class, the field and the value."""
import math
import typing
from dataclasses import fields

from .errors import ConfigError

_DESCRIPTIONS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
                 list: "a list", type(None): "null"}


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Union:
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is not None:
        hint = origin
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is list:
        return isinstance(value, (list, tuple, set, frozenset))
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint
    return _DESCRIPTIONS.get(hint, getattr(hint, "__name__", str(hint)))


def is_number(value) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value, minimum: int = 1) -> bool:
    """An int >= minimum, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_types(config) -> None:
    """ConfigError for the first dataclass field whose value does not match its annotation, or is a NaN
    or infinite number."""
    owner = type(config).__name__
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{owner}: {f.name}={value!r} must be {_describe(hints[f.name])}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{owner}: {f.name}={value!r} must be a finite number")


def check_at_least(config, names, minimum) -> None:
    """ConfigError for the first of `names` whose value is not None and below `minimum`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{type(config).__name__}: {name}={value!r} must be >= {minimum}")


def check_fraction(config, names) -> None:
    """ConfigError for the first of `names` (probabilities: dropout rates) outside [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{type(config).__name__}: {name}={value!r} must be in [0, 1)")
