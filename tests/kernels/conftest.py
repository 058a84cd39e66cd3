"""Where the Triton kernel tests run, and the bf16 accuracy check they share.

Triton decides at ``@triton.jit`` time (i.e. when ``tunelab.kernels`` is first imported) whether
kernels are compiled for a GPU or run by its CPU interpreter, and the main pytest process has
imported tunelab long before this file is read. So:

- on a CUDA machine the kernel tests run directly on the GPU;
- in a process started with ``TRITON_INTERPRET=1`` they run on CPU through the interpreter;
- otherwise (plain CPU CI) they skip here and ``test_interpreter.py`` re-runs these files in a
  subprocess with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tunelab.kernels import HAS_TRITON, backend


def _kernel_device() -> str | None:
    if not HAS_TRITON:
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    return None


KERNEL_DEVICE = _kernel_device()

# Triton's CPU interpreter (3.x) converts fp32 -> bf16 by truncation, not round-to-nearest as
# the GPU does, which doubles the error of every bf16 store; the bf16 check allows for that.
BF16_FACTOR = 4.0 if KERNEL_DEVICE == "cpu" else 2.0


@pytest.fixture
def device() -> str:
    """The device the Triton kernels run on here; skips when they cannot run in-process."""
    if KERNEL_DEVICE is None:
        pytest.skip("Triton kernels run on CUDA, or on CPU in test_interpreter.py's subprocess")
    return KERNEL_DEVICE


@pytest.fixture
def triton_backend(device):
    """Force the Triton kernels (also for CPU tensors under the interpreter) in this test."""
    with backend("triton"):
        yield device


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """||x - truth|| / ||truth|| in float64."""
    x, truth = x.double(), truth.double()
    return ((x - truth).norm() / truth.norm().clamp_min(1e-30)).item()


@pytest.fixture
def assert_bf16_close():
    """``check(out, ref_low, truth, name)``: the kernel's bf16 result ``out`` must be no more than
    twice (4x under the truncating interpreter) as far, in relative L2, from the float64 ``truth``
    as the PyTorch reference run in bf16 (``ref_low``) is, plus 1e-3. That is "bf16 noise": the
    kernels keep fp32 intermediates and round once, the reference rounds after every op, so on
    the GPU the kernel is normally the closer one; a real bug (wrong index, missing term) is off
    by O(1)."""

    def check(out: torch.Tensor, ref_low: torch.Tensor, truth: torch.Tensor, name: str = "") -> None:
        assert out.dtype == ref_low.dtype, (name, out.dtype, ref_low.dtype)
        assert torch.isfinite(out).all(), name
        e_out, e_ref = rel_err(out, truth), rel_err(ref_low, truth)
        assert e_out <= BF16_FACTOR * e_ref + 1e-3, f"{name}: kernel rel err {e_out:.2e}, reference {e_ref:.2e}"

    return check
