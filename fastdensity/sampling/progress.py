"""Progress of the sequential samplers: one tick per generated pixel (PixelCNN) or feature (MADE).

A sampler loop cannot be shortened, so a caller that waits on it (``fastdensity sample``) wants to
see it move. Samplers report through a context variable rather than an argument, because the MADE
samplers run deep inside a flow's ``inverse`` where no extra argument reaches::

    with reporting(lambda: bar.update(1)):
        model.sample(64)          # the callback runs once per pixel / per feature and transform

Nothing is reported outside a ``reporting`` block, and a tick costs one context-variable lookup.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

__all__ = ["reporting", "tick"]

_CALLBACK: contextvars.ContextVar[Optional[Callable[[], None]]] = contextvars.ContextVar(
    "fastdensity_sampling_progress", default=None)


@contextlib.contextmanager
def reporting(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback()`` once per sequential step of every sampler run inside the block."""
    token = _CALLBACK.set(callback)
    try:
        yield
    finally:
        _CALLBACK.reset(token)


def tick() -> None:
    """One sequential step done (called by the samplers)."""
    callback = _CALLBACK.get()
    if callback is not None:
        callback()
