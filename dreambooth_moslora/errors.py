"""Every error meant for the user: a one-line message, shown as it is, never a traceback.

Command-line entry points catch ``MosloraError`` and print ``error: <message>``; the web demo shows
it on the page. Anything else that escapes is a bug.
"""


class MosloraError(Exception):
    """The base of every user-facing error of this toolkit."""


class AdapterError(MosloraError, ValueError):
    """A bad adapter setting, file or pairing of adapter and model."""


class AdapterFileError(AdapterError):
    """An adapter file that cannot be read safely (truncated, not safetensors, malformed)."""


class AdapterMismatchError(AdapterError):
    """An adapter that does not fit the model it is loaded into."""


class DataError(MosloraError, ValueError):
    """Training data that cannot be used."""


class TrainingError(MosloraError, RuntimeError):
    """A training run that cannot go on."""


class RequestError(MosloraError, ValueError):
    """A web-demo request that is refused."""
