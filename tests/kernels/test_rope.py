"""Triton RoPE (HF rotate-half layout) vs the PyTorch reference.

fp32 tolerance 1e-6 absolute: each output is two products and a sum in fp32 in both versions
(values O(1)), so only rounding order differs. bf16: conftest ``assert_bf16_close``.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import backend, rope, rope_reference
from tunelab.kernels.rope import RoPEFunction
from tunelab.modules.rope import RotaryEmbedding

TOL = dict(rtol=1e-6, atol=1e-6)


def _cos_sin(position_ids, head_dim, dtype, device):
    rot = RotaryEmbedding(head_dim, theta=10000.0).to(device)
    return rot(position_ids.to(device), dtype=dtype)  # (b, s, hd) each


def _q(b, h, s, d, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":  # what Attention passes: a transposed view of [b, s, h, d] memory
        x = torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_()


def _run(fn, x, cos, sin, dy):
    x = x.detach().requires_grad_()
    y = fn(x, cos, sin)
    return y, torch.autograd.grad(y, x, dy)[0]


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 12), (1, 4, 7, 8), (2, 1, 3, 64)])
def test_fp32_matches_reference(device, layout, shape):
    b, h, s, d = shape
    x = _q(b, h, s, d, torch.float32, device, layout)
    pos = torch.randint(0, 50, (b, s))
    cos, sin = _cos_sin(pos, d, torch.float32, device)
    dy = torch.randn(x.shape, device=device)
    y, dx = _run(RoPEFunction.apply, x, cos, sin, dy)
    y_ref, dx_ref = _run(rope_reference, x, cos, sin, dy)
    assert y.stride() == x.stride()  # same memory layout as the input
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)


def test_general_cos_sin_halves(device):
    """The kernel uses both halves of cos/sin, not only the first (no HF-only shortcut)."""
    x = _q(2, 3, 4, 10, torch.float32, device, "bhsd", seed=1)
    cos = torch.randn(2, 4, 10, device=device)
    sin = torch.randn(2, 4, 10, device=device)
    dy = torch.randn(x.shape, device=device)
    for a, b in zip(_run(RoPEFunction.apply, x, cos, sin, dy), _run(rope_reference, x, cos, sin, dy)):
        torch.testing.assert_close(a, b, **TOL)


def test_packed_positions_restart_per_document(device):
    """A packed row [doc of 3 | doc of 4] equals rotating each document on its own."""
    d = 16
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    x = _q(1, 2, 7, d, torch.float32, device, "bshd", seed=2)
    cos, sin = _cos_sin(pos, d, torch.float32, device)
    with backend("triton"):
        packed = rope(x, cos, sin)
        c1, s1 = _cos_sin(torch.arange(3)[None], d, torch.float32, device)
        c2, s2 = _cos_sin(torch.arange(4)[None], d, torch.float32, device)
        first = rope(x[:, :, :3], c1, s1)
        second = rope(x[:, :, 3:], c2, s2)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=2), **TOL)


def test_broadcast_cos_over_batch(device):
    x = _q(3, 2, 5, 8, torch.float32, device, "bshd", seed=3)
    cos, sin = _cos_sin(torch.arange(5)[None], 8, torch.float32, device)  # (1, s, d)
    dy = torch.randn(x.shape, device=device)
    ours = _run(RoPEFunction.apply, x, cos, sin, dy)
    ref = _run(rope_reference, x, cos, sin, dy)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_bf16_within_bf16_noise(device, layout, assert_bf16_close):
    x = _q(2, 4, 9, 32, torch.bfloat16, device, layout, seed=4)
    cos, sin = _cos_sin(torch.randint(0, 100, (2, 9)), 32, torch.bfloat16, device)
    dy = torch.randn(x.shape, device=device).bfloat16()
    ours = _run(RoPEFunction.apply, x, cos, sin, dy)
    low = _run(rope_reference, x, cos, sin, dy)
    truth = _run(rope_reference, x.double(), cos.double(), sin.double(), dy.double())
    for name, a, b, t in zip(["y", "dx"], ours, low, truth):
        assert_bf16_close(a, b, t, name)


def test_real_size_bf16_on_gpu(device, assert_bf16_close):
    if device != "cuda":
        pytest.skip("8B-size check runs on the GPU only")
    for h in (32, 8):  # q and k heads of Llama 3.1 8B
        x = _q(2, h, 2048, 128, torch.bfloat16, device, "bshd", seed=5)
        cos, sin = _cos_sin(torch.arange(2048)[None].expand(2, -1), 128, torch.bfloat16, device)
        dy = torch.randn(x.shape, device=device).bfloat16()
        ours = _run(RoPEFunction.apply, x, cos, sin, dy)
        low = _run(rope_reference, x, cos, sin, dy)
        truth = _run(rope_reference, x.double(), cos.double(), sin.double(), dy.double())
        for name, a, b, t in zip(["y", "dx"], ours, low, truth):
            assert_bf16_close(a, b, t, name)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        rope(torch.randn(1, 1, 2, 5), torch.randn(1, 2, 5), torch.randn(1, 2, 5))


def test_reference_dispatch_is_exact_module_math():
    x = torch.randn(2, 3, 4, 8)
    cos, sin = _cos_sin(torch.arange(4)[None].expand(2, -1), 8, torch.float32, "cpu")
    with backend("reference"):
        out = rope(x, cos, sin)
    half = x.chunk(2, dim=-1)
    rotated = torch.cat((-half[1], half[0]), dim=-1)
    assert torch.equal(out, x * cos[:, None] + rotated * sin[:, None])
