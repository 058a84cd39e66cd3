"""Fused Triton SwiGLU (silu(gate) * up) vs the PyTorch reference.

fp32 tolerance 1e-5 relative / 1e-6 absolute: a sigmoid and three products per element in fp32
in both versions (exp implementations differ by a few ulp). bf16: conftest ``assert_bf16_close``.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import backend, swiglu, swiglu_reference
from tunelab.kernels.swiglu import SwiGLUFunction

TOL = dict(rtol=1e-5, atol=1e-6)


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Spread over [-6, 6] so both saturated and linear parts of the sigmoid are exercised.
    gate = (3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    up = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return gate, up, dy


def _run(fn, gate, up, dy):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    y = fn(gate, up)
    return (y, *torch.autograd.grad(y, (gate, up), dy))


@pytest.mark.parametrize("shape", [(3, 7, 37), (1, 1), (5, 2048 + 3)])
def test_fp32_matches_reference(device, shape):
    gate, up, dy = _inputs(shape, torch.float32, device)
    for a, b in zip(_run(SwiGLUFunction.apply, gate, up, dy), _run(swiglu_reference, gate, up, dy)):
        torch.testing.assert_close(a, b, **TOL)


def test_non_contiguous_inputs(device):
    gate, up, dy = _inputs((6, 40), torch.float32, device, seed=1)
    gate, up, dy = gate.t(), up.t(), dy.t()  # (40, 6) transposed views
    for a, b in zip(_run(SwiGLUFunction.apply, gate, up, dy), _run(swiglu_reference, gate, up, dy)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("shape", [(4, 9, 160), (3, 1000)])
def test_bf16_within_bf16_noise(device, shape, assert_bf16_close):
    gate, up, dy = _inputs(shape, torch.bfloat16, device, seed=2)
    ours = _run(SwiGLUFunction.apply, gate, up, dy)
    low = _run(swiglu_reference, gate, up, dy)
    truth = _run(swiglu_reference, gate.double(), up.double(), dy.double())
    for name, a, b, t in zip(["y", "dgate", "dup"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_real_size_bf16_on_gpu(device, assert_bf16_close):
    if device != "cuda":
        pytest.skip("8B-size check runs on the GPU only")
    gate, up, dy = _inputs((4096, 14336), torch.bfloat16, device, seed=3)
    ours = _run(SwiGLUFunction.apply, gate, up, dy)
    low = _run(swiglu_reference, gate, up, dy)
    truth = _run(swiglu_reference, gate.double(), up.double(), dy.double())
    for name, a, b, t in zip(["y", "dgate", "dup"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_dispatch(device):
    gate, up, _ = _inputs((2, 8), torch.float32, device, seed=4)
    with backend("triton"):
        assert "SwiGLUFunction" in type(swiglu(gate.requires_grad_(), up).grad_fn).__name__
    with backend("reference"):
        assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))


@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 2048 + 3)])
def test_gelu_tanh_fp32_matches_reference(device, shape):
    """GeGLU (Gemma's gelu_pytorch_tanh gate) against F.gelu(approximate='tanh') * up run in
    fp64: torch's fp32 version rounds 1 + tanh(z) to 0 in the far negative tail, where the
    kernel's sigmoid(2z) form keeps the (tiny) value, so the fp64 run is the judge (fp32
    tolerance as above, absolute 1e-5 for values up to ~40)."""
    from tunelab.kernels import gated_act_reference

    gate, up, dy = _inputs(shape, torch.float32, device, seed=5)
    ours = _run(lambda g, u: SwiGLUFunction.apply(g, u, True), gate, up, dy)
    ref = _run(lambda g, u: gated_act_reference(g, u, "gelu_tanh"), gate.double(), up.double(), dy.double())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


def test_gelu_tanh_bf16_within_bf16_noise(device, assert_bf16_close):
    from tunelab.kernels import gated_act_reference

    gate, up, dy = _inputs((4, 9, 160), torch.bfloat16, device, seed=6)
    ref = lambda g, u: gated_act_reference(g, u, "gelu_tanh")  # noqa: E731
    ours = _run(lambda g, u: SwiGLUFunction.apply(g, u, True), gate, up, dy)
    low = _run(ref, gate, up, dy)
    truth = _run(ref, gate.double(), up.double(), dy.double())
    for name, a, b, t in zip(["y", "dgate", "dup"], ours, low, truth):
        assert_bf16_close(a, b, t, name)
