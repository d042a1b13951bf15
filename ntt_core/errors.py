"""The base of every error a user can cause and fix: bad input, a missing model, a damaged file.

Each module names its own kind (:class:`~ntt_core.images.ImageError`,
:class:`~ntt_core.checkpoints.ModelNotFoundError`, ...); the CLI, the plugin and the benchmarks
catch :class:`NttError` and show its message, one line, instead of a traceback.
"""


class NttError(ValueError):
    """An input, file, model or dataset that cannot be used; the message names it and says why.

    A ``ValueError``, so callers that caught those before still do."""


class RunStopped(NttError):
    """A run stopped on request (a person, the server shutting down) before it finished; the message
    says what was kept and how to resume."""
