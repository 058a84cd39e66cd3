"""LoRA linear as one autograd function: reuse the base input, skip the frozen weight's gradient.

``out = x W0^T + s (x A^T) B^T`` with ``W0`` [out, in] frozen, ``A`` [r, in], ``B`` [out, r],
``s = alpha / r``. The backward, with ``g = d out``::

    gB     = g B                        [N, r]
    grad_x = g W0 + s gB A
    grad_A = s gB^T x
    grad_B = s g^T (x A^T)
    grad_W0 = g^T x                     only if W0 requires grad (never under LoRA)

Only ``x`` and the small ``x A^T`` [N, r] are saved (the weights are parameters, not copies).
Autograd of the unfused module records four nodes (two linears, a scale, an add) and, with an
adapter dtype different from x's, a cast copy of x; here it is one node and the matmuls stay in
cuBLAS. This is torch-level code: there is no Triton kernel in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.kernels._dispatch import use_triton

__all__ = ["lora_linear", "lora_linear_reference", "LoRALinearFunction"]


def lora_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """PyTorch reference: ``x W0^T + scaling * (x A^T) B^T``, adapter math in the adapter dtype."""
    xa = x.to(lora_a.dtype)
    update = F.linear(F.linear(xa, lora_a), lora_b) * scaling
    return F.linear(x, weight) + update.to(x.dtype)


class LoRALinearFunction(torch.autograd.Function):
    """``x W0^T + s (x A^T) B^T`` with a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        xa = F.linear(x2.to(lora_a.dtype), lora_a)  # (N, r) in the adapter dtype
        out = F.linear(x2, weight)  # (N, out)
        if lora_b.dtype == out.dtype:
            out.addmm_(xa, lora_b.t(), alpha=scaling)  # fused add of the low-rank update
        else:
            out += (F.linear(xa, lora_b) * scaling).to(out.dtype)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shape = shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        g_a = g.to(lora_b.dtype)
        gb = g_a @ lora_b  # (N, r)
        grad_x = grad_w = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight  # (N, in)
            grad_x.addmm_(gb.to(grad_x.dtype), lora_a.to(grad_x.dtype), alpha=s)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x2  # (out, in): only when the base weight is trainable
        if ctx.needs_input_grad[2]:
            grad_a = (gb.t() @ x2.to(lora_a.dtype)).mul_(s)  # (r, in)
        if ctx.needs_input_grad[3]:
            grad_b = (g_a.t() @ xa).mul_(s)  # (out, r)
        return grad_x, grad_w, grad_a, grad_b, None


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """LoRA linear without dropout: the fused autograd function where the kernels run (CUDA by
    default, see ``tunelab.kernels`` backends), the PyTorch reference elsewhere.

    Args:
        x: input [..., in].
        weight: frozen base weight W0 [out, in] (dense, same dtype as x).
        lora_a: A [r, in].
        lora_b: B [out, r] (same dtype as A; may differ from x's, e.g. fp32 adapters on bf16).
        scaling: ``alpha / r``.

    Returns:
        [..., out] in x's dtype.
    """
    if use_triton(x):
        return LoRALinearFunction.apply(x, weight, lora_a, lora_b, scaling)
    return lora_linear_reference(x, weight, lora_a, lora_b, scaling)
