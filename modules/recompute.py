"""Whether the current forward is activation checkpointing's recompute.

Non-reentrant checkpointing runs a layer's forward again in backward only to refill the tensors
its backward saved; the outputs of that second run are thrown away. A module can therefore
skip work whose result nothing saves: the MLP's down projection (its backward needs only its
input), ~a seventh of the recomputed GEMM FLOPs of a Llama layer. ``training.steps.wrap_layers``
enters :func:`recomputing` around each recompute (checkpoint's ``context_fn``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["recomputing", "is_recomputing"]

_active = False


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed forward as a checkpoint recompute."""
    global _active
    previous, _active = _active, True
    try:
        yield
    finally:
        _active = previous


def is_recomputing() -> bool:
    """True inside :func:`recomputing` (under torch.compile: a guard, one graph per value)."""
    return _active
