"""The kernel switch: when the Triton kernels run and when the PyTorch references do.

Backends (set with ``set_backend`` / the ``backend`` context manager, or the environment
variable ``TUNELAB_KERNELS`` read at import):

- ``"auto"`` (default): Triton kernels for CUDA tensors when ``triton`` imports; the PyTorch
  references for everything else (CPU, MPS, no Triton). CPU numerics are therefore exactly
  those of the plain modules.
- ``"triton"``: always the Triton kernels and fused autograd functions. CPU tensors then need
  Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported); tests use
  this to run the kernels without a GPU.
- ``"reference"``: always the PyTorch references (kernels off), e.g. to compare losses.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:  # Triton is optional: CPU-only and macOS installs run the references.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "reference")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("kernel backend 'triton' needs the triton package; use 'auto' or 'reference'")
    return name


_backend = _check(os.environ.get("TUNELAB_KERNELS", "auto"))


def get_backend() -> str:
    """The current backend name: ``auto``, ``triton`` or ``reference``."""
    return _backend


def set_backend(name: str) -> None:
    """Switch every kernel dispatch to ``name`` (``auto`` | ``triton`` | ``reference``)."""
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` inside the block, restore the previous one after."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Should the op on tensor ``x`` run the Triton kernel (True) or the reference (False)?"""
    if _backend == "reference":
        return False
    if _backend == "triton":
        return True
    return HAS_TRITON and x.is_cuda
