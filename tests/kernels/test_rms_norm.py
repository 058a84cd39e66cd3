"""Triton RMSNorm vs the PyTorch reference (forward, dx, optional dweight).

fp32 tolerance 1e-5 (relative and absolute): both compute in fp32 and differ only in the order
of the row sum; a wrong term would be off by O(1). bf16: see conftest ``assert_bf16_close``.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import backend, rms_norm, rms_norm_reference
from tunelab.kernels.rms_norm import RMSNormFunction

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(shape, dtype, device, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, w.requires_grad_(weight_grad), dy


def _run(fn, x, w, dy, eps=1e-5):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_(w.requires_grad)
    y = fn(x, w, eps)
    inputs = (x, w) if w.requires_grad else (x,)
    grads = torch.autograd.grad(y, inputs, dy)
    return (y, *grads)


# Odd widths (not a power of two), 1-row and 3-d inputs.
SHAPES = [(3, 5, 100), (1, 64), (17, 33), (2, 3, 7, 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_fp32_matches_reference(device, shape, weight_grad):
    x, w, dy = _inputs(shape, torch.float32, device, weight_grad)
    ours = _run(RMSNormFunction.apply, x, w, dy)
    ref = _run(rms_norm_reference, x, w, dy)
    assert len(ours) == (3 if weight_grad else 2)  # no dweight when the weight is frozen
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("shape", [(4, 9, 200), (6, 128)])
def test_bf16_within_bf16_noise(device, shape, assert_bf16_close):
    x, w, dy = _inputs(shape, torch.bfloat16, device, seed=1)
    ours = _run(RMSNormFunction.apply, x, w, dy)
    low = _run(rms_norm_reference, x, w, dy)
    truth = _run(rms_norm_reference, x.double(), w.double(), dy.double())
    for name, a, b, t in zip(["y", "dx", "dw"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_bf16_input_fp32_weight_promotes_like_reference(device):
    x, w, dy = _inputs((5, 40), torch.bfloat16, device, seed=2)
    w32 = w.detach().float().requires_grad_()
    ours = _run(RMSNormFunction.apply, x, w32, dy.float())
    ref = _run(rms_norm_reference, x, w32, dy.float())
    assert ours[0].dtype == ref[0].dtype == torch.float32
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_real_size_bf16_on_gpu(device, assert_bf16_close):
    if device != "cuda":
        pytest.skip("8B-size check runs on the GPU only")
    x, w, dy = _inputs((4096, 4096), torch.bfloat16, device, weight_grad=False, seed=3)
    ours = _run(RMSNormFunction.apply, x, w, dy)
    low = _run(rms_norm_reference, x, w, dy)
    truth = _run(rms_norm_reference, x.double(), w.double(), dy.double())
    for name, a, b, t in zip(["y", "dx"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_dispatch_uses_reference_without_kernels():
    x = torch.randn(3, 10)
    w = torch.randn(10)
    with backend("reference"):
        assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    # On CPU without the interpreter, "auto" picks the reference too (bit-identical).
    if not x.is_cuda:
        with backend("auto"):
            assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_dispatch_triton_path(triton_backend):
    x, w, dy = _inputs((3, 50), torch.float32, triton_backend)
    y = rms_norm(x, w, 1e-6)
    assert y.grad_fn is not None and "RMSNormFunction" in type(y.grad_fn).__name__


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_plus_one_fp32_matches_reference(device, shape, weight_grad):
    """Gemma's norm (scale 1 + w, fp32 until one final rounding) against its reference."""
    x, w, dy = _inputs(shape, torch.float32, device, weight_grad, seed=3)
    w = (0.3 * w.detach()).requires_grad_(weight_grad)  # Gemma's weights sit around 0
    ours = _run(lambda a, b, e: RMSNormFunction.apply(a, b, e, True), x, w, dy)
    ref = _run(lambda a, b, e: rms_norm_reference(a, b, e, True), x, w, dy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_plus_one_bf16_keeps_the_input_dtype(device, assert_bf16_close):
    x, w, dy = _inputs((4, 9, 200), torch.bfloat16, device, seed=4)
    w32 = (0.3 * w.detach().float()).requires_grad_()
    ours = _run(lambda a, b, e: RMSNormFunction.apply(a, b, e, True), x, w32, dy)
    low = _run(lambda a, b, e: rms_norm_reference(a, b, e, True), x, w32, dy)
    truth = _run(lambda a, b, e: rms_norm_reference(a, b, e, True), x.double(), w32.double(), dy.double())
    assert ours[0].dtype == low[0].dtype == torch.bfloat16
    for name, a, b, t in zip(["y", "dx", "dw"], ours, low, truth):
        assert_bf16_close(a, b, t, name)
