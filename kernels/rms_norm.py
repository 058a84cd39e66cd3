"""RMSNorm forward + backward in Triton, with the PyTorch reference it is tested against.

``y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` (Hugging Face's ``LlamaRMSNorm``): the
statistics are fp32 whatever the input dtype, the normalised row is rounded to the input dtype
before the scale, and the output dtype is ``promote(weight.dtype, x.dtype)``. With
``plus_one`` (Gemma's norm) the scale is ``1 + weight``, everything is fp32 until the output,
which is rounded once to x's dtype: ``y = (x * rsqrt(mean(x^2) + eps) * (1 + weight)).to(x.dtype)``.

One program normalises one row in a single pass (the whole row fits in registers for Llama
widths). The forward saves only ``x`` and the fp32 ``rstd`` per row. The backward computes
``dx = rstd * (dy*w - xhat * mean(dy*w * xhat))`` per row and, only when ``weight`` requires a
gradient (base norms are frozen under LoRA), per-program partial sums of ``dy * xhat`` that
torch adds up.
"""

from __future__ import annotations

import torch

from tunelab.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rms_norm", "rms_norm_reference", "RMSNormFunction"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
    """PyTorch RMSNorm over the last dim: fp32 statistics, cast back, then scale (``plus_one``:
    scale by ``1 + weight`` in fp32, then cast back)."""
    in_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if plus_one:
        return (x32 * (1.0 + weight.float())).to(in_dtype)
    return weight * x32.to(in_dtype)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr,
                      PLUS_ONE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        if PLUS_ONE:  # Gemma: fp32 all the way, one rounding at the end
            y = x * rstd * (1.0 + w)
        else:  # Llama: round the normalised row to x's dtype before the scale, as the reference
            y = (x * rstd).to(X.dtype.element_ty).to(tl.float32) * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd(
        DY, X, W, RSTD, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
        BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr, PLUS_ONE: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if PLUS_ONE:
            w = w + 1.0
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        row_start = pid * rows_per_program
        for i in range(0, rows_per_program):
            row = (row_start + i).to(tl.int64)
            if row < n_rows:
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                xhat = x * rstd
                dyw = dy * w
                # d/dx of x*rstd(x): rstd * (g - xhat * mean(g * xhat)) with g = dy * w.
                dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, axis=0) / n_cols))
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    if PLUS_ONE:
                        dw_acc += dy * xhat
                    else:
                        dw_acc += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, cols] with unit column stride (copies only if it has to)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # A few waves of programs: enough parallelism, few dweight partial rows to add up.
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm kernels (see ``rms_norm``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
        shape = x.shape
        x2 = _rows(x)  # (rows, dim)
        n_rows, n_cols = x2.shape
        out_dtype = x.dtype if plus_one else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        if n_rows > 0:
            _rms_norm_fwd[(n_rows,)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                BLOCK=block, PLUS_ONE=plus_one, num_warps=min(max(block // 256, 1), 16),
            )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        ctx.plus_one = plus_one
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, n_cols = x2.shape
        dx = torch.empty_like(x2)
        compute_dw = ctx.needs_input_grad[1]
        programs = max(_num_programs(n_rows, x2.device), 1)
        rows_per_program = triton.cdiv(n_rows, programs) if n_rows else 0
        dw_partial = (
            torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
            if compute_dw
            else rstd  # placeholder pointer, never written
        )
        block = triton.next_power_of_2(n_cols)
        if n_rows > 0:
            _rms_norm_bwd[(programs,)](
                dy2, x2, weight, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                BLOCK=block, COMPUTE_DW=compute_dw, PLUS_ONE=ctx.plus_one,
                num_warps=min(max(block // 256, 1), 16),
            )  # fmt: skip
        dw = None
        if compute_dw:
            dw = dw_partial.sum(0).to(weight.dtype) if n_rows else torch.zeros_like(weight)
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension: Triton on CUDA (see ``tunelab.kernels`` backends),
    the PyTorch reference elsewhere.

    Args:
        x: input [..., dim] (any float dtype; statistics are fp32).
        weight: scale [dim]. Its gradient is computed only if it requires grad.
        eps: added to the mean square.
        plus_one: Gemma's form, scale ``1 + weight`` in fp32 (see the module docstring).

    Returns:
        [..., dim] in ``promote(x.dtype, weight.dtype)`` (``plus_one``: x's dtype).
    """
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, eps, plus_one)
    return rms_norm_reference(x, weight, eps, plus_one)
