"""The library's error types. Both are ValueErrors, so `except ValueError` still catches them; each message
starts with what is wrong: the file, the field or key, and the value."""


class ConfigError(ValueError):
    """A config (a model's config.json, an adapter_config.json, a dataclass built in code) with a field of the
    wrong type or value."""


class CheckpointError(ValueError):
    """A checkpoint, adapter or training-state file or folder that cannot be loaded as it is: unreadable,
    truncated, a pickle, a torn save, keys or shapes that do not match the model."""
