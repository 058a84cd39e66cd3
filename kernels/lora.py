"""LoRA linear as one autograd function: reuse the base input, skip the frozen weight's gradient.

``out = x W0^T + s (x A^T) B^T`` with ``W0`` [out, in] frozen, ``A`` [r, in], ``B`` [out, r],
``s = alpha / r``. The backward, with ``g = d out``::

    gB     = g B                        [N, r]
    grad_x = g W0 + s gB A
    grad_A = s gB^T x
    grad_B = s g^T (x A^T)
    grad_W0 = g^T x                     only if W0 requires grad (never under LoRA)

Only ``x`` and the small ``x A^T`` [N, r] are saved (the weights are parameters, not copies).
Autograd of the unfused module records four nodes (two linears, a scale, an add); here it is one
node and the matmuls stay in cuBLAS, all in x's dtype (fp32 adapters are cast down, see below). This is torch-level code: there is no Triton kernel in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.kernels._dispatch import use_triton

__all__ = ["lora_linear", "lora_linear_reference", "LoRALinearFunction"]


def lora_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """PyTorch reference: ``x W0^T + scaling * (x A^T) B^T``, all matmuls in x's dtype (the
    adapter weights are cast down, never the activations up)."""
    update = F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling
    return F.linear(x, weight) + update


class LoRALinearFunction(torch.autograd.Function):
    """``x W0^T + s (x A^T) B^T`` with a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        # Mixed precision: fp32 adapters are cast down to x's dtype (A is only [r, in]);
        # casting the [N, in] activations up instead would copy them and run fp32 GEMMs.
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xa = F.linear(x2, a)  # (N, r)
        out = F.linear(x2, weight)  # (N, out)
        out.addmm_(xa, b.t(), alpha=scaling)  # fused add of the low-rank update
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.adapter_dtype = lora_a.dtype
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, a, b = ctx.saved_tensors  # a, b: the adapters in x's dtype
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)  # (N, out)
        gb = g @ b  # (N, r)
        grad_x = grad_w = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight  # (N, in)
            grad_x.addmm_(gb, a, alpha=s)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x2  # (out, in): only when the base weight is trainable
        # adapter grads: GEMMs in x's dtype (fp32 accumulate), handed back in the adapter dtype
        if ctx.needs_input_grad[2]:
            grad_a = (gb.t() @ x2).mul_(s).to(ctx.adapter_dtype)  # (r, in)
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ xa).mul_(s).to(ctx.adapter_dtype)  # (out, r)
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
