"""Exceptions with one-line messages meant for the user, not for a traceback."""


class AdapterError(ValueError):
    """A bad adapter setting, file or pairing of adapter and model."""


class AdapterFileError(AdapterError):
    """An adapter file that cannot be read safely (truncated, not safetensors, malformed)."""


class AdapterMismatchError(AdapterError):
    """An adapter that does not fit the model it is loaded into."""
