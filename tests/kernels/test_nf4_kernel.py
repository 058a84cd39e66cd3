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


def test_dequantize_into_a_given_buffer(triton_backend):
    """``out=``: the kernel writes into the caller's buffer (a slice of a larger one, as the
    NF4 layers' shared workspace is) and returns it; a wrong buffer is refused."""
    w4 = to_nf4(torch.randn(33, 17, generator=torch.Generator().manual_seed(1)).to(triton_backend))
    args, kw = _args(w4)
    workspace = torch.full((w4.numel() + 5,), float("nan"), device=triton_backend)
    out = dequantize_nf4(*args, **kw, dtype=torch.float32, out=workspace[: w4.numel()])
    assert out.data_ptr() == workspace.data_ptr()
    torch.testing.assert_close(out, dequantize_nf4_reference(*args, **kw, dtype=torch.float32), rtol=1e-6, atol=1e-12)
    assert workspace[w4.numel():].isnan().all()  # nothing written past the weight
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(*args, **kw, dtype=torch.bfloat16, out=workspace[: w4.numel()])


def test_nf4_layers_share_one_workspace_on_cuda():
    """On CUDA every NF4 layer dequantizes into one buffer per (device, dtype), sized by the
    largest weight; forward and backward still equal the dense layer's (the buffer is never
    saved for backward)."""
    if not torch.cuda.is_available():
        pytest.skip("the shared dequantization buffer is used on CUDA only")
    from tunelab.modules.nf4 import linear as nf4_linear_mod

    torch.manual_seed(0)
    weights = [torch.randn(o, i, device="cuda") * 0.02 for o, i in ((64, 96), (192, 64), (96, 192))]
    layers = [nf4_linear_mod.NF4Linear(to_nf4(w)) for w in weights]
    x = torch.randn(4, 96, device="cuda", requires_grad=True)
    y = x
    for layer in layers:
        y = layer(y)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    dense = [layer.weight.dequantize() for layer in layers]
    x2 = x.detach().requires_grad_()
    y2 = x2
    for w in dense:
        y2 = y2 @ w.t()
    (grad2,) = torch.autograd.grad(y2.square().sum(), x2)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad2, rtol=1e-5, atol=1e-6)
    buf = nf4_linear_mod._workspaces[(torch.device("cuda", torch.cuda.current_device()), torch.float32)]
    assert buf.numel() == max(w.numel() for w in weights)
