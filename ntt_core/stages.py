"""Named stages of a prediction, for profilers and benchmarks.

The predictor runs each step inside ``stage(name)``: a ``torch.profiler.record_function`` label
``ntt.<name>`` (seen by ``torch.profiler`` traces) and, while a hook is set with :func:`observe`
(a benchmark's timer, a FLOP counter), the hook's context around the step. With neither, a label
costs about 10 microseconds on CPU, once per image and stage (once per prompt batch for the decoder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar

from torch.profiler import record_function

#: ``hook(name, items)`` -> the context a stage runs in; ``items``: how many candidates or prompts
#: the stage works on where that sets its cost, else None.
StageHook = Callable[[str, "int | None"], AbstractContextManager]

_hook: ContextVar[StageHook | None] = ContextVar("ntt_stage_hook", default=None)


@contextlib.contextmanager
def stage(name: str, items: int | None = None) -> Iterator[None]:
    """Label the enclosed step ``ntt.<name>`` and run it in ``hook(name, items)``, the hook set by
    :func:`observe`, if any."""
    hook = _hook.get()
    with record_function(f"ntt.{name}"):
        if hook is None:
            yield
        else:
            with hook(name, items):
                yield


@contextlib.contextmanager
def observe(hook: StageHook) -> Iterator[None]:
    """Run every :func:`stage` entered in this context (this thread or task) inside ``hook(name, items)``."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)
