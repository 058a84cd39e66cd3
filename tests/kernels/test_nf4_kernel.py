"""The Triton NF4 dequantization kernel against the PyTorch reference, bit for bit.

Runs on CUDA, or on CPU under Triton's interpreter (``test_interpreter.py`` starts that
subprocess; in a plain CPU process the ``device`` fixture skips). Shapes are small on purpose.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels.nf4 import _dequantize_nf4_triton, dequantize_nf4, dequantize_nf4_reference
from tunelab.modules.nf4 import to_nf4

# sizes: one block, a short last block, odd length (padding nibble), several 256-block scales,
# one past a whole program of the tiled kernel (64 blocks = 4096 weights), odd over 2 programs
SHAPES = [(64,), (33, 17), (5,), (1,), (3, 7000), (4097,), (3, 2731)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _args(w4):
    code, absmax_code = w4.levels()
    return (w4.codes, w4.absmax_q, w4.absmax_scale, w4.absmax_offset, code, absmax_code), dict(
        numel=w4.numel(), block_size=w4.block_size, scaler_block_size=w4.scaler_block_size
    )


def _expected(args, kw, dtype, device):
    """The reference in ``dtype``, which the kernel must equal exactly: it computes the same fp32
    products (compiled without multiply-add fusion) and rounds once. Triton's CPU interpreter
    truncates fp32 -> bf16 instead of rounding to nearest, so there the bf16 reference is the
    truncated fp32 one (still an exact comparison)."""
    ref = dequantize_nf4_reference(*args, **kw, dtype=torch.float32)
    if dtype == torch.bfloat16 and device == "cpu":
        return (ref.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return ref.to(dtype)


def _random_nf4(shape, device, seed=0, **quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return to_nf4(w.to(device), **quant)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(triton_backend, shape):
    w4 = _random_nf4(shape, triton_backend)
    args, kw = _args(w4)
    for dtype in DTYPES:
        out = dequantize_nf4(*args, **kw, dtype=dtype)
        assert out.dtype == dtype and out.shape == (w4.numel(),)
        torch.testing.assert_close(out, _expected(args, kw, dtype, triton_backend), rtol=0, atol=0)


@pytest.mark.parametrize(
    "block_size, scaler_block_size",
    # powers of two run the tiled kernel (2: one byte per row); 6 and 48 the flat fallback
    [(2, 4), (32, 256), (128, 3), (256, 256), (6, 256), (48, 5)],
)
def test_other_block_sizes(triton_backend, block_size, scaler_block_size):
    for n in (1, block_size - 1, 4097, 9001):
        w4 = _random_nf4((n,), triton_backend, seed=n, block_size=block_size, scaler_block_size=scaler_block_size)
        args, kw = _args(w4)
        for dtype in DTYPES:
            out = dequantize_nf4(*args, **kw, dtype=dtype)
            torch.testing.assert_close(out, _expected(args, kw, dtype, triton_backend), rtol=0, atol=0,
                                       msg=lambda m: f"n={n} block_size={block_size} {dtype}: {m}")


@pytest.mark.parametrize("bytes_per_program, num_warps", [(8, 1), (1024, 4), (2048, 8), (8192, 8)])
def test_launch_shapes(triton_backend, bytes_per_program, num_warps):
    """Every launch shape bench/nf4_dequant.py sweeps gives the same values, down to programs
    smaller than one block (bytes_per_program=8 < 32 bytes: one block per program)."""
    w4 = _random_nf4((7, 1171), triton_backend)
    args, kw = _args(w4)
    for dtype in DTYPES:
        out = _dequantize_nf4_triton(*args, **kw, dtype=dtype, bytes_per_program=bytes_per_program,
                                     num_warps=num_warps)
        torch.testing.assert_close(out, _expected(args, kw, dtype, triton_backend), rtol=0, atol=0)


def test_weight_dequantize_uses_kernel(triton_backend):
    """NF4Weight.dequantize goes through the dispatch and keeps shape and dtype."""
    w = torch.randn(8, 96, device=triton_backend)
    w4 = to_nf4(w)
    out = w4.dequantize()
    assert out.shape == w.shape and out.dtype == w.dtype
    with torch.no_grad():
        ref = dequantize_nf4_reference(*_args(w4)[0], **_args(w4)[1], dtype=torch.float32).view(8, 96)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dequantize_into_a_given_buffer(triton_backend):
    """``out=``: the kernel writes into the caller's buffer (a slice of a larger one, as the
    NF4 layers' shared workspace is) and returns it; a wrong buffer is refused."""
    w4 = _random_nf4((33, 17), triton_backend, seed=1)  # odd: the last byte's low nibble is padding
    args, kw = _args(w4)
    for dtype in DTYPES:
        workspace = torch.full((w4.numel() + 5,), float("nan"), dtype=dtype, device=triton_backend)
        out = dequantize_nf4(*args, **kw, dtype=dtype, out=workspace[: w4.numel()])
        assert out.data_ptr() == workspace.data_ptr()
        torch.testing.assert_close(out, _expected(args, kw, dtype, triton_backend), rtol=0, atol=0)
        assert workspace[w4.numel():].isnan().all()  # nothing written past the weight
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(*args, **kw, dtype=torch.bfloat16, out=workspace[: w4.numel()].float())


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
