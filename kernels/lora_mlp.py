"""Llama's SwiGLU MLP with LoRA on gate, up and down as one autograd node, the gate / up
updates added inside the SwiGLU kernel.

``out = down(silu(gate(x)) * up(x))`` where each projection is a LoRA linear
``p(z) = z W^T + s (z A^T) B^T``. Written as three LoRA functions plus a SwiGLU, every rank-r
update ``s (z A^T) B^T`` is a full [N, out] tensor that one GEMM writes and the base GEMM reads
back in its epilogue: for gate and up (forward) and down (input gradient) that is [N, hidden],
3.5x the model width, three writes and three reads of 117 MB per 8B layer.

Here the base GEMMs write ``g0 = x Wg^T`` and ``u0 = x Wu^T`` alone, and the SwiGLU kernels
compute the rank-r products tile by tile in registers (a [BM, r] x [r, BN] dot per tile) while
they read ``g0`` / ``u0``::

    forward   g = g0 + s_g xa_g Bg^T,  u = u0 + s_u xa_u Bu^T,  h = silu(g) u     (one kernel)
    backward  dh = dh0 + gbd Ad,  with dh0 = d_out Wd and gbd = s_d d_out Bd      (one kernel,
              dg, du from dh and the recomputed g, u)                               with the rest)

``xa = x [Ag; Au]^T`` [N, r_g + r_u] comes from one GEMM (x read once). The down projection's
forward and the gate / up input gradient are those of ``lora_linear`` / the group function
(their updates are [N, dim], the small side). Saved for backward: x, xa, g0, u0, h and
``h Ad^T``, as the unfused path saves x, gate, up, h and the xa's.

Measured on an H200 (8B, fast profile, bench/results/breakdown.jsonl 9741bb6 vs 261b64a): the
GEMM phase drops ~7 ms a step, the SwiGLU kernels grow from 6.8 to 11.4 ms (120 / 205 us per call
against the plain kernels' 87 / 142: the in-register products and the recomputed g, u), GPU busy
241.0 -> 237.7 ms: a small gain, not the 12 ms the removed GEMMs first seemed to cost.
"""

from __future__ import annotations

import torch

from tunelab.kernels._dispatch import HAS_TRITON, interpreting, use_triton
from tunelab.kernels.lora import BaseWeight, _dense, group_input_grad, lora_linear_reference, mm_plus_low_rank
from tunelab.kernels.swiglu import swiglu_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["lora_swiglu", "lora_swiglu_reference", "LoRASwiGLUFunction", "MAX_RANK"]

# Ranks above this take the unfused path: the [BM, r] and [r, BN] operand tiles of the in-kernel
# product must stay small next to the [BM, BN] elementwise tiles.
MAX_RANK = 64
# tile and launch shape of both kernels: the fastest of bench/lora_mlp_bench.py's sweep on an H200
# (bench/results/kernels.jsonl); bigger tiles spill registers in the backward
CONFIG = dict(BM=16, BN=128, num_warps=4)


def lora_swiglu_reference(x: torch.Tensor, weights: list[BaseWeight], adapters_a: list[torch.Tensor],
                          adapters_b: list[torch.Tensor], scalings: list[float]) -> torch.Tensor:
    """PyTorch reference: three ``lora_linear_reference`` projections around ``silu(g) * u``.
    Lists are ordered gate, up, down."""
    g, u = (lora_linear_reference(x, w, a, b, s) for w, a, b, s in
            zip(weights[:2], adapters_a[:2], adapters_b[:2], scalings[:2]))
    return lora_linear_reference(swiglu_reference(g, u), weights[2], adapters_a[2], adapters_b[2], scalings[2])


if HAS_TRITON:

    @triton.jit
    def _low_rank_tile(L, l_stride, R, r_stride_k, r_stride_n, rows, cols, row_mask, col_mask, rank,
                       K: tl.constexpr, DOT_FP32: tl.constexpr):
        """``L[rows, :rank] @ R[:rank, cols]`` as a [BM, BN] fp32 tile (R addressed by strides; the
        rank padded to K with zeros, K >= 16 as tl.dot wants)."""
        k = tl.arange(0, K)
        left = tl.load(L + rows[:, None] * l_stride + k[None, :],
                       mask=row_mask[:, None] & (k[None, :] < rank), other=0.0)
        right = tl.load(R + k[:, None] * r_stride_k + cols[None, :] * r_stride_n,
                        mask=(k[:, None] < rank) & col_mask[None, :], other=0.0)
        if DOT_FP32:  # fp32 operands (exact products), and Triton's CPU interpreter has no bf16 dot
            return tl.dot(left.to(tl.float32), right.to(tl.float32), input_precision="ieee")
        return tl.dot(left, right)  # bf16 / fp16 operands, fp32 accumulate

    @triton.jit
    def _gate_up(G0, U0, XA, BG, BU, offs, mask, rows, cols, row_mask, col_mask, xa_stride, r_g, r_u, s_g, s_u,
                 K: tl.constexpr, DOT_FP32: tl.constexpr):
        """The full gate and up pre-activations of a tile in fp32: base + s * xa B^T."""
        g = tl.load(G0 + offs, mask=mask, other=0.0).to(tl.float32)
        g += s_g * _low_rank_tile(XA, xa_stride, BG, 1, r_g, rows, cols, row_mask, col_mask, r_g, K, DOT_FP32)
        u = tl.load(U0 + offs, mask=mask, other=0.0).to(tl.float32)
        u += s_u * _low_rank_tile(XA + r_g, xa_stride, BU, 1, r_u, rows, cols, row_mask, col_mask, r_u, K, DOT_FP32)
        return g, u

    @triton.jit
    def _swiglu_lora_fwd(G0, U0, XA, BG, BU, Y, n_rows, n_cols, xa_stride, r_g, r_u, s_g, s_u,
                         BM: tl.constexpr, BN: tl.constexpr, K: tl.constexpr, DOT_FP32: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_mask, col_mask = rows < n_rows, cols < n_cols
        offs = rows[:, None] * n_cols + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        g, u = _gate_up(G0, U0, XA, BG, BU, offs, mask, rows, cols, row_mask, col_mask, xa_stride, r_g, r_u,
                        s_g, s_u, K, DOT_FP32)
        tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_lora_bwd(DH, GBD, AD, G0, U0, XA, BG, BU, DG, DU, n_rows, n_cols, xa_stride, r_g, r_u, r_d,
                         s_g, s_u, BM: tl.constexpr, BN: tl.constexpr, K: tl.constexpr, DOT_FP32: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_mask, col_mask = rows < n_rows, cols < n_cols
        offs = rows[:, None] * n_cols + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        # dh = dh0 + gbd Ad: the down projection's input gradient, its rank-r part added here
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        dh += _low_rank_tile(GBD, r_d, AD, n_cols, 1, rows, cols, row_mask, col_mask, r_d, K, DOT_FP32)
        g, u = _gate_up(G0, U0, XA, BG, BU, offs, mask, rows, cols, row_mask, col_mask, xa_stride, r_g, r_u,
                        s_g, s_u, K, DOT_FP32)
        sig = tl.sigmoid(g)
        tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dh * g * sig).to(DU.dtype.element_ty), mask=mask)


def _launch_args(g0: torch.Tensor, ranks) -> tuple[tuple[int, int], dict]:
    n_rows, n_cols = g0.shape
    meta = dict(CONFIG, K=max(16, triton.next_power_of_2(max(ranks))),
                DOT_FP32=g0.dtype == torch.float32 or interpreting())
    return (triton.cdiv(n_rows, meta["BM"]), triton.cdiv(n_cols, meta["BN"])), meta


def _swiglu_lora_fwd_eager(g0: torch.Tensor, u0: torch.Tensor, xa: torch.Tensor, bg: torch.Tensor,
                           bu: torch.Tensor, s_g: float, s_u: float) -> torch.Tensor:
    """``silu(g) * u`` with ``g = g0 + s_g xa[:, :r_g] bg^T``, ``u = u0 + s_u xa[:, r_g:] bu^T``."""
    g0, u0, xa, bg, bu = (t.contiguous() for t in (g0, u0, xa, bg, bu))
    h = torch.empty_like(g0)
    grid, meta = _launch_args(g0, (bg.shape[1], bu.shape[1]))
    _swiglu_lora_fwd[grid](g0, u0, xa, bg, bu, h, g0.shape[0], g0.shape[1], xa.stride(0), bg.shape[1], bu.shape[1],
                           s_g, s_u, **meta)
    return h


def _swiglu_lora_bwd_eager(dh0: torch.Tensor, gbd: torch.Tensor, ad: torch.Tensor, g0: torch.Tensor,
                           u0: torch.Tensor, xa: torch.Tensor, bg: torch.Tensor, bu: torch.Tensor, s_g: float,
                           s_u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d gate, d up of the forward above, given ``d h = dh0 + gbd ad``."""
    dh0, gbd, ad, g0, u0, xa, bg, bu = (t.contiguous() for t in (dh0, gbd, ad, g0, u0, xa, bg, bu))
    dg, du = torch.empty_like(g0), torch.empty_like(u0)
    grid, meta = _launch_args(g0, (bg.shape[1], bu.shape[1], ad.shape[0]))
    _swiglu_lora_bwd[grid](dh0, gbd, ad, g0, u0, xa, bg, bu, dg, du, g0.shape[0], g0.shape[1], xa.stride(0),
                           bg.shape[1], bu.shape[1], ad.shape[0], s_g, s_u, **meta)
    return dg, du


# Under torch.compile the launches are opaque custom ops: traced as user-defined Triton kernels,
# inductor compiled them into 2.2x slower code (268 / 427 us per call vs 120 / 205 us launched
# here, 8B shapes on an H200: bench/lora_mlp_bench.py --in-function); eager calls skip the ops'
# dispatch cost.
_swiglu_lora_fwd_op = torch.library.custom_op("tunelab::swiglu_lora_fwd", mutates_args=())(_swiglu_lora_fwd_eager)
_swiglu_lora_bwd_op = torch.library.custom_op("tunelab::swiglu_lora_bwd", mutates_args=())(_swiglu_lora_bwd_eager)


@_swiglu_lora_fwd_op.register_fake
def _(g0, u0, xa, bg, bu, s_g, s_u):
    return torch.empty_like(g0)


@_swiglu_lora_bwd_op.register_fake
def _(dh0, gbd, ad, g0, u0, xa, bg, bu, s_g, s_u):
    return torch.empty_like(g0), torch.empty_like(u0)


def _swiglu_lora_fwd_call(*args) -> torch.Tensor:
    return _swiglu_lora_fwd_op(*args) if torch.compiler.is_compiling() else _swiglu_lora_fwd_eager(*args)


def _swiglu_lora_bwd_call(*args) -> tuple[torch.Tensor, torch.Tensor]:
    return _swiglu_lora_bwd_op(*args) if torch.compiler.is_compiling() else _swiglu_lora_bwd_eager(*args)


class LoRASwiGLUFunction(torch.autograd.Function):
    """The LoRA SwiGLU MLP as one node (see the module docstring).

    Args after ``x`` [..., dim]: ``scalings`` (gate, up, down), ``compute_output`` (False: the
    down projection's base GEMM is skipped, as ``lora_linear``'s ``compute_output``),
    ``residual`` (None, or [..., dim] added to the output inside the down GEMMs), then the
    bases Wg, Wu [hidden, dim], Wd [dim, hidden] (frozen; dense or dequantizing functions), the
    A's Ag, Au [r, dim], Ad [r, hidden] and the B's Bg, Bu [hidden, r], Bd [dim, r].
    """

    @staticmethod
    def forward(ctx, x, scalings, compute_output, residual, *args):
        (w_g, w_u, w_d), (a_g, a_u, a_d), adapters_b = args[:3], args[3:6], args[6:]
        s_g, s_u, s_d = scalings
        dt, shape = x.dtype, x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, dim)
        a_gu = torch.cat([a_g.to(dt), a_u.to(dt)])  # (r_g + r_u, dim)
        ad = a_d.to(dt)
        bg, bu, bd = (b.to(dt) for b in adapters_b)
        xa = x2 @ a_gu.t()  # (N, r_g + r_u)
        g0 = x2 @ _dense(w_g, dt).t()  # (N, hidden): base products only, the updates come in the kernel
        u0 = x2 @ _dense(w_u, dt).t()
        h = _swiglu_lora_fwd_call(g0, u0, xa, bg, bu, s_g, s_u)  # (N, hidden)
        xa_d = h @ ad.t()  # (N, r_d)
        out = mm_plus_low_rank(h, _dense(w_d, dt).t(), xa_d, bd.t(), s_d, skip=not compute_output, c=residual)
        weights = (w_g, w_u, w_d)
        ctx.weight_fns = [None if isinstance(w, torch.Tensor) else w for w in weights]
        ctx.save_for_backward(x2, xa, g0, u0, h, xa_d, a_gu, ad, bg, bu, bd,
                              *(w for w in weights if isinstance(w, torch.Tensor)))
        ctx.scalings, ctx.shape = scalings, shape
        ctx.adapter_dtypes = [a.dtype for a in args[3:6]]
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, g0, u0, h, xa_d, a_gu, ad, bg, bu, bd, *dense = ctx.saved_tensors
        dense = iter(dense)
        w_g, w_u, w_d = [next(dense) if fn is None else fn for fn in ctx.weight_fns]
        s_g, s_u, s_d = ctx.scalings
        r_g = bg.shape[1]
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)  # (N, dim)
        gbd = (g @ bd).mul_(s_d)  # (N, r_d)
        dh0 = g @ _dense(w_d, g.dtype)  # (N, hidden): base part of d h; the kernel adds gbd Ad
        dg, du = _swiglu_lora_bwd_call(dh0, gbd, ad, g0, u0, xa, bg, bu, s_g, s_u)  # (N, hidden) each
        del dh0
        gb = torch.cat([(dg @ bg).mul_(s_g), (du @ bu).mul_(s_u)], dim=1)  # (N, r_g + r_u), scaled
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = group_input_grad(gb, a_gu, [dg, du], [w_g, w_u]).view(ctx.shape)
        grad_a_gu = gb.t() @ x2  # (r_g + r_u, dim)
        dt_g, dt_u, dt_d = ctx.adapter_dtypes
        grads_a = (grad_a_gu[:r_g].to(dt_g), grad_a_gu[r_g:].to(dt_u), (gbd.t() @ h).to(dt_d))
        grads_b = ((dg.t() @ xa[:, :r_g]).mul_(s_g).to(dt_g), (du.t() @ xa[:, r_g:]).mul_(s_u).to(dt_u),
                   (g.t() @ xa_d).mul_(s_d).to(dt_d))
        grad_residual = grad_out if ctx.needs_input_grad[3] else None
        return (grad_x, None, None, grad_residual, None, None, None, *grads_a, *grads_b)


def lora_swiglu(x: torch.Tensor, weights: list[BaseWeight], adapters_a: list[torch.Tensor],
                adapters_b: list[torch.Tensor], scalings: list[float], compute_output: bool = True,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with three LoRA projections: :class:`LoRASwiGLUFunction`
    where the kernels run and every rank is at most ``MAX_RANK``, the reference elsewhere.

    Args:
        x: input [..., dim].
        weights: frozen bases Wg, Wu [hidden, dim] and Wd [dim, hidden] (dense in x's dtype, or
            dequantizing functions as in ``lora_linear``).
        adapters_a: Ag, Au [r, dim], Ad [r, hidden] (one dtype).
        adapters_b: Bg, Bu [hidden, r], Bd [dim, r].
        scalings: ``alpha / r`` of each.
        compute_output: False where the caller will not read the result (a checkpoint recompute).
        residual: optional [..., dim] added to the result (the residual stream), inside the
            down projection's GEMMs on the fused path.

    Returns:
        [..., dim] in x's dtype.
    """
    if use_triton(x) and max(a.shape[0] for a in adapters_a) <= MAX_RANK:
        return LoRASwiGLUFunction.apply(x, tuple(scalings), compute_output, residual, *weights, *adapters_a,
                                        *adapters_b)
    out = lora_swiglu_reference(x, weights, adapters_a, adapters_b, scalings)
    return out if residual is None else residual + out
