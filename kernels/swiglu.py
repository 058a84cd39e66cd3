"""Gated activations ``act(gate) * up`` fused forward + backward in Triton: SwiGLU (``silu``,
Llama) and GeGLU with tanh-approximated GELU (``gelu_tanh``, Gemma).

SwiGLU, with ``sig = sigmoid(gate)``::

    y      = gate * sig * up
    d_gate = dy * up * sig * (1 + gate * (1 - sig))
    d_up   = dy * gate * sig

GeGLU: ``gelu_tanh(g) = 0.5 g (1 + tanh(z))`` with ``z = c (g + 0.044715 g^3)``, ``c =
sqrt(2 / pi)``, computed as ``g * s`` with ``s = sigmoid(2 z) = (1 + tanh(z)) / 2`` (no
cancellation where tanh is near -1)::

    y      = gate * s * up
    d_gate = dy * up * (s + 2 * gate * s * (1 - s) * c * (1 + 3 * 0.044715 gate^2))
    d_up   = dy * gate * s

The unfused PyTorch version launches three elementwise kernels forward (and saves silu(gate)
as an extra activation) and five backward; here each direction is one pass over the
[tokens, hidden] tensors in fp32 registers, and only gate and up are saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["gated_act", "gated_act_reference", "swiglu", "swiglu_reference", "SwiGLUFunction", "ACTIVATIONS"]

_BLOCK = 1024
ACTIVATIONS = ("silu", "gelu_tanh")


def gated_act_reference(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """PyTorch ``act(gate) * up`` (``silu`` or ``gelu_tanh``)."""
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch SwiGLU: ``silu(gate) * up``."""
    return gated_act_reference(gate, up, "silu")


if HAS_TRITON:

    @triton.jit
    def _gated_fwd(G, U, Y, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # sigmoid(2z)
        else:
            a = g * tl.sigmoid(g)
        tl.store(Y + offs, (a * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            s = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # sigmoid(2z)
            a = g * s
            da = s + 2.0 * g * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        else:
            sig = tl.sigmoid(g)
            a = g * sig
            da = sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + offs, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * a).to(DU.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton gated-activation kernels (SwiGLU, or GeGLU with
    ``gelu=True``)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        gate = gate.contiguous()
        up = up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _gated_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, BLOCK=_BLOCK, GELU=gelu, num_warps=4)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg = torch.empty_like(gate)
        du = torch.empty_like(up)
        n = gate.numel()
        if n:
            _gated_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_BLOCK, GELU=ctx.gelu, num_warps=4)
        return dg, du, None


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` (``silu``: SwiGLU; ``gelu_tanh``: GeGLU): one fused Triton kernel each
    way on CUDA, PyTorch elsewhere.

    Args:
        gate: output of the gate projection [..., hidden].
        up: output of the up projection, same shape and dtype.
        act: one of :data:`ACTIVATIONS`.
    """
    if use_triton(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return SwiGLUFunction.apply(gate, up, act == "gelu_tanh")
    return gated_act_reference(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (see :func:`gated_act`)."""
    return gated_act(gate, up, "silu")
