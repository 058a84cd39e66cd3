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

__all__ = ["lora_linear", "lora_linear_reference", "LoRALinearFunction", "BaseWeight", "lora_linear_group",
           "LoRAGroupFunction"]

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
                            alpha: float, skip: bool = False, c: torch.Tensor | None = None) -> torch.Tensor:
    if skip:  # an output nobody reads (see LoRALinearFunction's compute_output): no GEMM
        return m1.new_empty(m1.shape[0], m2.shape[1])
    # The rank-r product first, then the big GEMM accumulates onto it (beta = alpha scales the
    # update): its epilogue reads the update while the GEMM is compute-bound, where adding the
    # update afterwards was a separate memory-bound pass over the [N, out] result (read + write;
    # ~23 ms of a 360 ms 8B lean step on an H200, bench/results/breakdown.jsonl).
    if c is None:
        return torch.mm(l1, l2).addmm_(m1, m2, beta=alpha)
    # A residual: torch's addmm copies it into the result and the rank-r GEMM accumulates onto it,
    # one read fewer than the separate add pass over the sum it replaces (8B fast step on an
    # H200: 64 adds of 30 us gone, 64 copies of 16 us added; bench/results/breakdown.jsonl c0436b9).
    return torch.addmm(c, l1, l2, alpha=alpha).addmm_(m1, m2)


@torch.library.custom_op("tunelab::mm_plus_low_rank", mutates_args=())
def _mm_plus_low_rank_op(m1: torch.Tensor, m2: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor,
                         alpha: float, skip: bool = False, c: torch.Tensor | None = None) -> torch.Tensor:
    return _mm_plus_low_rank_eager(m1, m2, l1, l2, alpha, skip, c)


@_mm_plus_low_rank_op.register_fake
def _(m1, m2, l1, l2, alpha, skip=False, c=None):
    return m1.new_empty(m1.shape[0], m2.shape[1])


def mm_plus_low_rank(m1: torch.Tensor, m2: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor,
                     alpha: float, skip: bool = False, c: torch.Tensor | None = None) -> torch.Tensor:
    """``m1 @ m2 + alpha * l1 @ l2`` (l1 @ l2 of rank r), plus ``c`` [..., out] if given (a
    residual, taken as [N, out]): the update, then the GEMM added onto it in place.

    Under torch.compile the in-place add would be functionalized into an out-of-place addmm,
    which inductor runs as a copy of the base product plus the addmm (an extra read and write
    of every LoRA output and input gradient: 15 ms of a 390 ms 8B step on an H200, 673 device
    copies per step in bench/results/h200.jsonl's breakdown). An opaque custom op keeps it in
    place; eager calls skip the op's dispatch cost. ``skip`` returns uninitialised memory of the
    result's shape instead, from the same op: a compiled graph that skips is then the same graph
    as one that computes, so both save the same tensors for backward (checkpointing checks).
    """
    c = None if c is None else c.reshape(m1.shape[0], m2.shape[1])
    if torch.compiler.is_compiling():
        return _mm_plus_low_rank_op(m1, m2, l1, l2, alpha, skip, c)
    return _mm_plus_low_rank_eager(m1, m2, l1, l2, alpha, skip, c)


class LoRALinearFunction(torch.autograd.Function):
    """``x W0^T + s (x A^T) B^T`` (``+ residual`` if given) with a hand-written backward (see
    the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float, compute_output: bool = True, residual=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        # Mixed precision: fp32 adapters are cast down to x's dtype (A is only [r, in]);
        # casting the [N, in] activations up instead would copy them and run fp32 GEMMs.
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xa = F.linear(x2, a)  # (N, r)
        # (N, out); compute_output=False: the caller never reads it (a checkpoint recompute), the
        # backward needs only what is saved below
        out = mm_plus_low_rank(x2, _dense(weight, x.dtype).t(), xa, b.t(), scaling, skip=not compute_output,
                               c=residual)
        if isinstance(weight, torch.Tensor):
            ctx.weight_fn = None
            ctx.save_for_backward(x2, xa, weight, a, b)
        else:  # a quantized base: rebuilt in the backward
            ctx.weight_fn = weight
            ctx.save_for_backward(x2, xa, a, b)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.adapter_dtype = lora_a.dtype
        ctx.has_residual = residual is not None
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
        # the residual's gradient is the output's (returned only when one was passed)
        grad_residual = grad_out if ctx.has_residual else None
        return grad_x, grad_w, grad_a, grad_b, None, None, grad_residual


@torch.library.custom_op("tunelab::mm_sum_plus_low_rank", mutates_args=())
def _mm_sum_plus_low_rank_op(m1s: list[torch.Tensor], m2s: list[torch.Tensor], l1: torch.Tensor,
                             l2: torch.Tensor) -> torch.Tensor:
    """``l1 @ l2 + sum_i m1s[i] @ m2s[i]`` in one buffer, each GEMM accumulating in its epilogue
    (opaque under torch.compile for the reason ``mm_plus_low_rank`` gives)."""
    out = torch.mm(l1, l2)
    for m1, m2 in zip(m1s, m2s):
        out.addmm_(m1, m2)
    return out


@_mm_sum_plus_low_rank_op.register_fake
def _(m1s, m2s, l1, l2):
    return l1.new_empty(l1.shape[0], l2.shape[1])


def group_input_grad(gb_cat: torch.Tensor, a_cat: torch.Tensor, grads: list, weights: list) -> torch.Tensor:
    """``gb_cat a_cat + sum_i grads[i] W_i`` [N, in] in one buffer, skipping None grads: the input
    gradient of several LoRA linears of one input (``gb_cat`` [N, R] already scaled)."""
    used = [(g, w) for g, w in zip(grads, weights) if g is not None]
    if torch.compiler.is_compiling():
        return _mm_sum_plus_low_rank_op([g for g, _ in used], [_dense(w, g.dtype) for g, w in used], gb_cat, a_cat)
    # eager dequantizing bases share one buffer: use each right after it is rebuilt
    grad_x = torch.mm(gb_cat, a_cat)
    for g, w in used:
        grad_x.addmm_(g, _dense(w, g.dtype))
    return grad_x


class LoRAGroupFunction(torch.autograd.Function):
    """Several LoRA linears of one input (q/k/v; gate/up) as one autograd node.

    Forward: one ``x [A_1; ...; A_k]^T`` GEMM for all the adapters' down-projections (the
    input is read once, not k times), then each output as in :class:`LoRALinearFunction`.
    Backward, with ``gb_i = s_i g_i B_i``::

        grad_x = [gb_1, ..., gb_k] [A_1; ...; A_k] + sum_i g_i W_i     one buffer, GEMMs accumulating
        grad_A = [gb_1, ..., gb_k]^T x                                  one GEMM, split by rows
        grad_B_i = s_i g_i^T (x A_i^T)

    Bases must be frozen (dense tensors or dequantizing functions, as in ``lora_linear``).
    Args after ``x``: ``scalings`` (tuple of k floats), ``compute_outputs`` (False: the base
    GEMMs are skipped, as ``lora_linear``'s ``compute_output``), then the k bases, k A's, k B's.
    """

    @staticmethod
    def forward(ctx, x, scalings, compute_outputs, *args):
        k = len(scalings)
        weights, adapters_a, adapters_b = args[:k], args[k:2 * k], args[2 * k:]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        a_cat = torch.cat([a.to(x.dtype) for a in adapters_a])  # (R, in), R = sum of ranks
        bs = [b.to(x.dtype) for b in adapters_b]
        xa = x2 @ a_cat.t()  # (N, R): every adapter's x A_i^T from one read of x
        ranks = [a.shape[0] for a in adapters_a]
        outs, start = [], 0
        for w, b, s, r in zip(weights, bs, scalings, ranks):
            out = mm_plus_low_rank(x2, _dense(w, x.dtype).t(), xa[:, start:start + r], b.t(), s,
                                   skip=not compute_outputs)
            outs.append(out.view(*shape[:-1], out.shape[-1]))
            start += r
        dense = [w for w in weights if isinstance(w, torch.Tensor)]
        ctx.weight_fns = [None if isinstance(w, torch.Tensor) else w for w in weights]
        ctx.save_for_backward(x2, xa, a_cat, *bs, *dense)
        ctx.k, ctx.ranks, ctx.scalings, ctx.shape = k, ranks, scalings, shape
        ctx.adapter_dtypes = [a.dtype for a in adapters_a]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        k = ctx.k
        x2, xa, a_cat, *rest = ctx.saved_tensors
        bs, dense = rest[:k], iter(rest[k:])
        weights = [next(dense) if fn is None else fn for fn in ctx.weight_fns]
        gs = [None if g is None else g.reshape(-1, g.shape[-1]).to(x2.dtype) for g in grad_outs]
        gbs = [torch.zeros(x2.shape[0], r, dtype=x2.dtype, device=x2.device) if g is None else (g @ b).mul_(s)
               for g, b, s, r in zip(gs, bs, ctx.scalings, ctx.ranks)]
        gb_cat = torch.cat(gbs, dim=1)  # (N, R), already scaled
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = group_input_grad(gb_cat, a_cat, gs, weights).view(ctx.shape)
        grad_a_cat = gb_cat.t() @ x2  # (R, in)
        grad_as, grad_bs, start = [], [], 0
        for i, (g, r, s) in enumerate(zip(gs, ctx.ranks, ctx.scalings)):
            grad_as.append(grad_a_cat[start:start + r].to(ctx.adapter_dtypes[i])
                           if ctx.needs_input_grad[3 + k + i] else None)
            want_b = ctx.needs_input_grad[3 + 2 * k + i] and g is not None
            grad_bs.append((g.t() @ xa[:, start:start + r]).mul_(s).to(ctx.adapter_dtypes[i]) if want_b else None)
            start += r
        return (grad_x, None, None, *([None] * k), *grad_as, *grad_bs)


def lora_linear_group(x: torch.Tensor, weights: list[BaseWeight], adapters_a: list[torch.Tensor],
                      adapters_b: list[torch.Tensor], scalings: list[float],
                      compute_outputs: bool = True) -> tuple[torch.Tensor, ...]:
    """``lora_linear`` of several frozen bases on the same ``x`` (one autograd node; see
    :class:`LoRAGroupFunction`): the fused function where kernels run, the reference elsewhere.

    Args:
        x: input [..., in].
        weights: the bases W_i [out_i, in] (or dequantizing functions), frozen.
        adapters_a, adapters_b: A_i [r_i, in] and B_i [out_i, r_i] (one dtype for all A's).
        scalings: ``alpha_i / r_i``.
        compute_outputs: False where the caller reads none of the outputs (a checkpoint
            recompute), as ``lora_linear``'s ``compute_output``.

    Returns:
        The k outputs [..., out_i] in x's dtype.
    """
    if use_triton(x):
        return LoRAGroupFunction.apply(x, tuple(scalings), compute_outputs, *weights, *adapters_a, *adapters_b)
    return tuple(lora_linear_reference(x, w, a, b, s) for w, a, b, s in zip(weights, adapters_a, adapters_b, scalings))


def lora_linear(
    x: torch.Tensor, weight: BaseWeight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    compute_output: bool = True, residual: torch.Tensor | None = None,
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
        compute_output: False where the caller will not read the result (a checkpoint
            recompute): the fused function then skips the base GEMM but saves the same tensors
            for backward. The reference path always computes it.
        residual: optional [..., out] added to the result (a transformer's residual stream):
            the fused function adds it inside the rank-r GEMM, saving a separate add pass.

    Returns:
        [..., out] in x's dtype.
    """
    if use_triton(x):
        return LoRALinearFunction.apply(x, weight, lora_a, lora_b, scaling, compute_output, residual)
    out = lora_linear_reference(x, weight, lora_a, lora_b, scaling)
    return out if residual is None else residual + out
