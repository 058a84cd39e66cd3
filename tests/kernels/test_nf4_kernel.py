"""The Triton NF4 dequantization kernel against the PyTorch reference.

Runs on CUDA, or on CPU under Triton's interpreter (``test_nf4_interpreter.py`` starts that
subprocess; in a plain CPU process the ``device`` fixture skips). Shapes are small on purpose.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference
from tunelab.modules.nf4 import to_nf4

# sizes: one block, a short last block, odd length (padding nibble), several 256-block scales
SHAPES = [(64,), (33, 17), (5,), (3, 7000)]


def _args(w4):
    code, absmax_code = w4.levels()
    return (w4.codes, w4.absmax_q, w4.absmax_scale, w4.absmax_offset, code, absmax_code), dict(
        numel=w4.numel(), block_size=w4.block_size, scaler_block_size=w4.scaler_block_size
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(triton_backend, shape):
    """fp32 output: equal up to one fp32 rounding (the GPU may fuse the scale's multiply-add),
    so rtol 1e-6. bf16/fp16: the kernel rounds the same fp32 value once; the interpreter
    truncates to bf16 instead of rounding, so allow one bf16 ulp (rtol 2^-7)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.02
    w4 = to_nf4(w.to(triton_backend))
    args, kw = _args(w4)
    for dtype, rtol in ((torch.float32, 1e-6), (torch.bfloat16, 2**-7), (torch.float16, 2**-10)):
        out = dequantize_nf4(*args, **kw, dtype=dtype)
        ref = dequantize_nf4_reference(*args, **kw, dtype=dtype)
        assert out.dtype == dtype and out.shape == (w.numel(),)
        torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-12)


def test_weight_dequantize_uses_kernel(triton_backend):
    """NF4Weight.dequantize goes through the dispatch and keeps shape and dtype."""
    w = torch.randn(8, 96, device=triton_backend)
    w4 = to_nf4(w)
    out = w4.dequantize()
    assert out.shape == w.shape and out.dtype == w.dtype
    with torch.no_grad():
        ref = dequantize_nf4_reference(*_args(w4)[0], **_args(w4)[1], dtype=torch.float32).view(8, 96)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-12)
