"""What a module may skip when activation checkpointing runs its forward a second time.

Non-reentrant checkpointing runs a layer's forward again in backward only to refill the tensors
its backward saved; the outputs of that second run are thrown away. A module can therefore
skip work whose result nothing saves: the MLP's down projection (its backward needs only its
input), ~a seventh of the recomputed GEMM FLOPs of a Llama layer. ``training.steps.wrap_layers``
enters :func:`recomputing` around each recompute (checkpoint's ``context_fn``).

**Kept regions.** A piece of the forward may also be *kept* instead of recomputed
(:func:`kept`): in the forward its saved tensors go to a :class:`Keeper` (which parks them in
pinned host memory) rather than being dropped by the checkpoint, and its output is remembered;
the recompute then returns that output without running the piece, whose backward unpacks its
own saved tensors from the keeper. Attention keeps RoPE + SDPA this way, so the rerun also
skips the q/k/v projections that only fed them (their saved inputs are still refilled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Protocol

import torch

__all__ = ["recomputing", "is_recomputing", "Keeper", "keeping", "keeps_regions", "kept"]

_active = False
_keeper: Keeper | None = None  # the checkpointed call's keeper (forward and its recompute)
_keeping = False  # _keeper is not None; a plain bool so compiled code guards on its value


class Keeper(Protocol):
    """One checkpointed call's store for kept regions (``training.offload`` implements it)."""

    def run(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """Run ``fn(*args)`` with its saved tensors kept here, remember and return its output."""

    def replay(self) -> torch.Tensor:
        """The next remembered output, in the order :meth:`run` stored them."""


@contextlib.contextmanager
def _set(active: bool, keeper: Keeper | None) -> Iterator[None]:
    global _active, _keeper, _keeping, _kept_eagerly
    if keeper is not None and _kept_eagerly is _kept:
        _kept_eagerly = torch.compiler.disable(_kept)
    previous = _active, _keeper
    _active, _keeper, _keeping = active, keeper, keeper is not None
    try:
        yield
    finally:
        _active, _keeper = previous
        _keeping = _keeper is not None


def recomputing(keeper: Keeper | None = None) -> contextlib.AbstractContextManager:
    """Mark the enclosed forward as a checkpoint recompute (replaying ``keeper``'s regions)."""
    return _set(True, keeper)


def keeping(keeper: Keeper) -> contextlib.AbstractContextManager:
    """Run the enclosed (checkpointed) forward with its kept regions stored in ``keeper``."""
    return _set(False, keeper)


def is_recomputing() -> bool:
    """True inside :func:`recomputing` (under torch.compile: a guard, one graph per value)."""
    return _active


def keeps_regions() -> bool:
    """True where :func:`kept` keeps (or replays) instead of just running (a guard, as above)."""
    return _keeping


def kept(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)``, kept for checkpointing's recompute where :func:`keeps_regions` holds.

    Args:
        fn: a piece of the forward returning one tensor; it must be deterministic given
            ``args`` (the recompute uses the forward's output instead of calling it).
        args: its inputs.
    """
    return _kept_eagerly(fn, *args)


def _kept(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    if _keeper is None:
        return fn(*args)
    if _active:
        return _keeper.replay()
    return _keeper.run(fn, *args)


# What kept calls: _kept, wrapped by torch.compiler.disable (it must run eagerly: its saved
# tensors must reach the keeper's hooks) the first time a keeper is set. The wrap is not done at
# import because it imports torch._dynamo (~1 s of every process's start); kept only runs under a
# keeper, so it always sees the wrapped function.
_kept_eagerly: Callable[..., torch.Tensor] = _kept
