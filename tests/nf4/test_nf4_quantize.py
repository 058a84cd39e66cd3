"""NF4 storage against bitsandbytes (the oracle), on CPU.

bitsandbytes' CPU ``quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)``
must give the very same bytes as ``to_nf4``: packed codes, 8-bit block scales, fp32 scales of the
scales and the offset. Dequantization must then agree exactly (same fp32 products, one rounding
to the output dtype).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tunelab.modules.nf4 import NF4Weight, dynamic_code, nf4_bytes_per_param, nf4_code, to_nf4

bnb = pytest.importorskip("bitsandbytes.functional")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# 64*256 = 16384 values per scale block: cover exact multiples, short 64-blocks, short
# 256-blocks, odd lengths (bitsandbytes pads the last nibble), 1-d and 2-d.
SHAPES = [(64, 64), (256, 64), (300, 70), (33, 17), (7,), (1,), (16384 * 2 + 64 * 3 + 5,), (128, 131), (24, 160)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes(monkeypatch):
    """bitsandbytes torch.compile's its odd-shape dequantize fallback; eager is the same math and
    saves seconds of compilation per test run."""
    from bitsandbytes.backends.default import ops

    fn = ops._dequantize_4bit_compute
    monkeypatch.setattr(ops, "_dequantize_4bit_compute", getattr(fn, "__wrapped__", fn))


def _bnb(w):
    return bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit, made blind to rows that are not whole 64-blocks.

    Blocks run over the flattened tensor. bitsandbytes 0.50's AVX-512 CPU kernel assumes each
    row holds whole blocks (it indexes the scales per row), so for e.g. [64, 160] it applies
    the wrong scales (its own quantize -> dequantize round trip then has 2.5x the error). Asking
    it for a [n / 64, 64] tensor instead gives the flat values every other bitsandbytes path
    (CUDA, scalar CPU, the torch fallback) computes.
    """
    import copy

    n = state.shape.numel()
    if n % 64:
        return bnb.dequantize_4bit(packed, state)
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size((n // 64, 64))
    return bnb.dequantize_4bit(packed, flat_state).reshape(state.shape)


def test_tables_match_bitsandbytes():
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map())
    assert torch.equal(nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_identical_to_bitsandbytes(shape, dtype):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    scale = float(torch.rand((), generator=g)) * 0.2 + 1e-3
    w = (torch.randn(shape, generator=g) * scale).to(dtype)
    packed, state = _bnb(w)
    w4 = to_nf4(w)
    assert torch.equal(w4.codes, packed.reshape(-1))
    assert torch.equal(w4.absmax_q, state.absmax)
    assert torch.equal(w4.absmax_scale, state.state2.absmax)
    assert torch.equal(w4.absmax_offset.reshape(()), state.offset.reshape(()))
    assert w4.shape == w.shape and w4.dtype == dtype
    # dequantized values: identical (both compute level * absmax in fp32, round once)
    ours = w4.dequantize()
    theirs = bnb_dequantize(packed, state)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_heavy_tails_and_zero_blocks():
    """Outliers, an all-zero block and a constant block (ties at the scale): still identical."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 256, generator=g) * 0.02
    w[0, :64] = 0.0
    w[1, :64] = 0.5
    w[2, 3] = 30.0
    w[5] = torch.distributions.StudentT(2.0).sample((256,)) * 0.01
    packed, state = _bnb(w)
    w4 = to_nf4(w)
    assert torch.equal(w4.codes, packed.reshape(-1)) and torch.equal(w4.absmax_q, state.absmax)
    assert torch.equal(w4.dequantize(), bnb_dequantize(packed, state))


def test_error_and_storage():
    """Relative RMS error of NF4 on Gaussian weights is ~0.1 (16 levels); storage <= 0.52 B/param."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1024, 1024, generator=g) * 0.02
    w4 = to_nf4(w)
    rel = ((w4.dequantize() - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.12, rel
    # codes 0.5 + 8-bit scales 1/64 + fp32 scale per 16384 + offset
    assert w4.nbytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 4 * 64 + 4
    assert w4.bytes_per_param == pytest.approx(nf4_bytes_per_param(1024 * 1024))
    assert w4.bytes_per_param <= 0.52
    assert nf4_bytes_per_param(4096 * 14336) == pytest.approx(0.5 + 1 / 64 + 4 / 16384, rel=1e-6)


def test_model_casts_leave_storage_alone():
    """A model-wide .half()/.to(bf16) must not round the fp32 scales; .to(device) moves all."""
    w = torch.randn(64, 128) * 0.02
    w4 = to_nf4(w)
    before = w4.dequantize()
    w4.half()
    w4.to(torch.bfloat16)
    assert w4.absmax_scale.dtype == torch.float32
    assert torch.equal(w4.dequantize(), before)
    assert w4.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        to_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="meta"):
        to_nf4(torch.empty(4, 4, device="meta"))
    w4 = to_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="absmax_q"):
        NF4Weight(w4.codes, w4.absmax_q[:-1], w4.absmax_scale, w4.absmax_offset, (8, 64), torch.float32)
