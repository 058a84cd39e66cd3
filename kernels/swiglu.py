"""SwiGLU activation ``silu(gate) * up`` fused forward + backward in Triton.

With ``sig = sigmoid(gate)``::

    y      = gate * sig * up
    d_gate = dy * up * sig * (1 + gate * (1 - sig))
    d_up   = dy * gate * sig

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

__all__ = ["swiglu", "swiglu_reference", "SwiGLUFunction"]

_BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch SwiGLU: ``silu(gate) * up``."""
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton SwiGLU kernels."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.contiguous()
        up = up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg = torch.empty_like(gate)
        du = torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_BLOCK, num_warps=4)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: one fused Triton kernel each way on CUDA, PyTorch elsewhere.

    Args:
        gate: output of the gate projection [..., hidden].
        up: output of the up projection, same shape and dtype.
    """
    if use_triton(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
