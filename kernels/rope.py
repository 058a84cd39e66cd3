"""Rotary position embedding (HF rotate-half layout) forward + backward in Triton.

With the head dimension split in halves ``x = [x1, x2]`` and ``cos = [c1, c2]``,
``sin = [s1, s2]`` (HF builds them as two copies of the same frequencies, but the kernel does
not rely on it)::

    y1 = x1 * c1 - x2 * s1          dx1 = dy1 * c1 + dy2 * s2
    y2 = x2 * c2 + x1 * s2          dx2 = dy2 * c2 - dy1 * s1

``cos``/``sin`` are [b, s, head_dim], gathered per token from ``position_ids`` by the model, so
packed rows whose positions restart at each document are handled by construction. ``x`` is
[b, n_heads, s, head_dim] with any strides (the attention module passes a transposed view of the
projection output, i.e. memory in [b, s, h, d] order); the output has the same strides.

One program handles one (batch, position): it loads that token's cos/sin once and rotates all
heads. Arithmetic is fp32 with a single rounding to the input dtype.
"""

from __future__ import annotations

import torch

from tunelab.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rope", "rope_reference", "RoPEFunction"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """PyTorch RoPE: x [b, h, s, hd] rotated by cos/sin [b, s, hd] (broadcast over heads)."""
    cos = cos.unsqueeze(1)  # (b, 1, s, hd)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


if HAS_TRITON:

    @triton.jit
    def _rope_kernel(
        X, COS, SIN, Y,
        sx_b, sx_h, sx_s, sx_d,
        sy_b, sy_h, sy_s, sy_d,
        sc_b, sc_s, sc_d,
        n_heads, seq_len, half,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        s = pid % seq_len
        heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
        dims = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
        d_mask = dims < half
        mask = (heads < n_heads) & d_mask

        cs = COS + b * sc_b + s * sc_s
        sn = SIN + b * sc_b + s * sc_s
        c1 = tl.load(cs + dims * sc_d, mask=d_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cs + (dims + half) * sc_d, mask=d_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sn + dims * sc_d, mask=d_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sn + (dims + half) * sc_d, mask=d_mask, other=0.0).to(tl.float32)

        xp = X + b * sx_b + s * sx_s + heads * sx_h
        x1 = tl.load(xp + dims * sx_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + (dims + half) * sx_d, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            # Transpose of the rotation: rotate by -angle.
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        yp = Y + b * sy_b + s * sy_s + heads * sy_h
        tl.store(yp + dims * sy_d, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + (dims + half) * sy_d, y2.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    b, h, s, d = x.shape
    cos = cos.expand(b, s, d)  # a [1, s, d] table broadcasts over the batch (stride 0)
    sin = sin.expand(b, s, d)
    if cos.stride() != sin.stride():  # the kernel indexes both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty_like(x)  # keeps x's strides when x is dense (e.g. a transposed view)
    if x.numel() == 0:
        return y
    half = d // 2
    block_h = triton.next_power_of_2(h)
    block_d = triton.next_power_of_2(half)
    _rope_kernel[(b * s,)](
        x, cos, sin, y,
        *x.stride(), *y.stride(), *cos.stride(),
        h, s, half,
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )  # fmt: skip
    return y


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RoPE kernel (no gradient for cos/sin)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by RoPE: Triton on CUDA, the PyTorch reference elsewhere.

    Args:
        x: queries or keys [b, n_heads, s, head_dim] (any strides; head_dim even).
        cos: [b, s, head_dim] (or [1, s, head_dim]) cosines of position * inv_freq for each
            token's own position, so packed rows restart positions at each document.
        sin: same shape as ``cos``.

    Returns:
        Rotated ``x``, same shape, dtype and strides.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {x.shape[-1]}")
    if use_triton(x):
        return RoPEFunction.apply(x, cos, sin)
    return rope_reference(x, cos, sin)
