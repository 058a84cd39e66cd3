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
node and the matmuls stay in cuBLAS, all in x's dtype (fp32 adapters are cast down, see below).
This is torch-level code: there is no Triton kernel in it.

``W0`` may also be given as a function ``dtype -> dense W0`` (a quantized base: QLoRA's NF4
layers dequantize into a shared buffer): it is called once in the forward and once in the
backward, so nothing weight-sized outlives either call. Without this, QLoRA ran the unfused
module path, whose many small ops left an H200 idle half of each 8B step (eager, Python-bound).
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from tunelab.kernels._dispatch import use_triton

__all__ = ["lora_linear", "lora_linear_reference", "LoRALinearFunction", "BaseWeight"]

# the frozen base: a dense [out, in] tensor, or a function giving it in the requested dtype
BaseWeight = Union[torch.Tensor, Callable[[torch.dtype], torch.Tensor]]


def _dense(weight: BaseWeight, dtype: torch.dtype) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight(dtype)


def lora_linear_reference(
    x: torch.Tensor, weight: BaseWeight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """PyTorch reference: ``x W0^T + scaling * (x A^T) B^T``, all matmuls in x's dtype (the
    adapter weights are cast down, never the activations up)."""
    update = F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling
    if not isinstance(weight, torch.Tensor):  # autograd would save the dense copy: keep it out
        return _FrozenLinear.apply(x, weight) + update
    return F.linear(x, weight) + update


class _FrozenLinear(torch.autograd.Function):
    """``x W0^T`` for a base given as a function: rebuilt in the backward, never saved."""

    @staticmethod
    def forward(ctx, x, weight_fn):
        ctx.weight_fn = weight_fn
        return F.linear(x, weight_fn(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.weight_fn(grad_out.dtype), None


def _mm_plus_low_rank_eager(m1: torch.Tensor, m2: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor,
                            alpha: float) -> torch.Tensor:
    # The rank-r product first, then the big GEMM accumulates onto it (beta = alpha scales the
    # update): its epilogue reads the update while the GEMM is compute-bound, where adding the
    # update afterwards was a separate memory-bound pass over the [N, out] result (read + write;
    # ~23 ms of a 360 ms 8B lean step on an H200, bench/results/breakdown.jsonl).
    return torch.mm(l1, l2).addmm_(m1, m2, beta=alpha)


@torch.library.custom_op("tunelab::mm_plus_low_rank", mutates_args=())
def _mm_plus_low_rank_op(m1: torch.Tensor, m2: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor,
                         alpha: float) -> torch.Tensor:
    return _mm_plus_low_rank_eager(m1, m2, l1, l2, alpha)


@_mm_plus_low_rank_op.register_fake
def _(m1, m2, l1, l2, alpha):
    return m1.new_empty(m1.shape[0], m2.shape[1])


def mm_plus_low_rank(m1: torch.Tensor, m2: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """``m1 @ m2 + alpha * l1 @ l2`` (l1 @ l2 of rank r): the update, then the GEMM added onto it in place.

    Under torch.compile the in-place add would be functionalized into an out-of-place addmm,
    which inductor runs as a copy of the base product plus the addmm (an extra read and write
    of every LoRA output and input gradient: 15 ms of a 390 ms 8B step on an H200, 673 device
    copies per step in bench/results/h200.jsonl's breakdown). An opaque custom op keeps it in
    place; eager calls skip the op's dispatch cost.
    """
    if torch.compiler.is_compiling():
        return _mm_plus_low_rank_op(m1, m2, l1, l2, alpha)
    return _mm_plus_low_rank_eager(m1, m2, l1, l2, alpha)


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
        out = mm_plus_low_rank(x2, _dense(weight, x.dtype).t(), xa, b.t(), scaling)  # (N, out)
        if isinstance(weight, torch.Tensor):
            ctx.weight_fn = None
            ctx.save_for_backward(x2, xa, weight, a, b)
        else:  # a quantized base: rebuilt in the backward
            ctx.weight_fn = weight
            ctx.save_for_backward(x2, xa, a, b)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.adapter_dtype = lora_a.dtype
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.weight_fn is None:
            x2, xa, weight, a, b = ctx.saved_tensors  # a, b: the adapters in x's dtype
        else:
            (x2, xa, a, b), weight = ctx.saved_tensors, None
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)  # (N, out)
        gb = g @ b  # (N, r)
        grad_x = grad_w = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            weight = weight if weight is not None else ctx.weight_fn(g.dtype)
            grad_x = mm_plus_low_rank(g, weight, gb, a, s).view(ctx.shape)  # (N, in)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x2  # (out, in): only when the base weight is trainable
        # adapter grads: GEMMs in x's dtype (fp32 accumulate), handed back in the adapter dtype
        if ctx.needs_input_grad[2]:
            grad_a = (gb.t() @ x2).mul_(s).to(ctx.adapter_dtype)  # (r, in)
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ xa).mul_(s).to(ctx.adapter_dtype)  # (out, r)
        return grad_x, grad_w, grad_a, grad_b, None


def lora_linear(
    x: torch.Tensor, weight: BaseWeight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """LoRA linear without dropout: the fused autograd function where the kernels run (CUDA by
    default, see ``tunelab.kernels`` backends), the PyTorch reference elsewhere.

    Args:
        x: input [..., in].
        weight: frozen base weight W0 [out, in] (dense, same dtype as x), or a function
            ``dtype -> W0`` for a quantized base (called in the forward and the backward).
        lora_a: A [r, in].
        lora_b: B [out, r] (same dtype as A; may differ from x's, e.g. fp32 adapters on bf16).
        scaling: ``alpha / r``.

    Returns:
        [..., out] in x's dtype.
    """
    if use_triton(x):
        return LoRALinearFunction.apply(x, weight, lora_a, lora_b, scaling)
    return lora_linear_reference(x, weight, lora_a, lora_b, scaling)
