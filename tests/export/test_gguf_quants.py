"""GGUF encoders (tunelab.models.gguf.quants) against the `gguf` package and llama.cpp.

Oracles:
- ``gguf.quants.dequantize`` decodes every type we write: it is the independent reader of the
  byte layouts (the package has no Q4_K/Q5_K/Q6_K encoder).
- ``gguf.quants.quantize`` encodes Q8_0/Q5_0/Q5_1/BF16 exactly like llama.cpp's reference
  code: our bytes must be identical.
- llama.cpp itself (``llama_cpp.llama_model_quantize`` with ftype Q4_K_M on a tiny F32 llama
  GGUF written with ``gguf.GGUFWriter``): per tensor, the type it picks must equal
  ``q4_k_m_type`` and our error must not exceed its error.

Inputs are fresh random fp32 rows: Gaussian, and Student-t with 3 degrees of freedom (heavy
tails, like real weight outliers), each row with its own scale over two decades.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from tunelab.models.gguf import quants as Q

from .oracle import llama_cpp_or_skip

# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def _rows(rng: np.random.Generator, shape: tuple[int, ...], dist: str) -> np.ndarray:
    """Random weights; each row gets its own scale in [1e-3, 1e-1]."""
    if dist == "normal":
        x = rng.standard_normal(shape)
    else:
        x = rng.standard_t(3, shape)
    scale = 10.0 ** rng.uniform(-3, -1, size=(*shape[:-1], 1))
    return (x * scale).astype(np.float32)


def _rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    """RMS error relative to RMS signal, per row, then averaged (rows have different scales).

    All-zero rows must decode to exact zeros; they are checked and left out of the average.
    """
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    y = y.reshape(-1, y.shape[-1]).astype(np.float64)
    signal = (x**2).mean(1)
    assert (y[signal == 0] == 0).all()
    return float(np.mean(np.sqrt(((y - x) ** 2).mean(1)[signal > 0] / signal[signal > 0])))


def _decode(data: np.ndarray, qtype: T) -> np.ndarray:
    return gguf.quants.dequantize(data, qtype)


BLOCK_TYPES = [T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]

# Round-trip bound on the relative RMSE, per type. A uniform quantizer with step D has RMS error
# D / sqrt(12); the step is the block's range over its number of codes, so for Gaussian rows:
#   Q8_0  range 2 * max|x| of 32 (~2 * 2.4 sigma) / 254 codes  -> ~0.0055
#   Q6_K  2 * max|x| of 16 (~2 * 2.0 sigma) / 64 codes         -> ~0.018
#   Q5_0  2 * max|x| of 32 / 32 codes                          -> ~0.043
#   Q5_1  max - min of 32 (~4.2 sigma) / 31                     -> ~0.039
#   Q5_K  as Q5_1 with a fitted scale/min, 6-bit coded         -> ~0.036
#   Q4_K  max - min of 32 / 15, fitted                         -> ~0.071
# (measured values agree). Student-t(3) rows have larger extremes per RMS, which stretches the
# step: ~1.3-1.6x those figures. The bounds are 1.25x the worst measured case (t rows), so a
# layout or scale bug (errors of order 1) fails while honest rounding passes.
REL_RMSE_BOUND = {
    T.Q8_0: 0.011,
    T.Q6_K: 0.033,
    T.Q5_0: 0.083,
    T.Q5_1: 0.075,
    T.Q5_K: 0.060,
    T.Q4_K: 0.118,
}

# ----------------------------------------------------------------------------------------------
# float formats
# ----------------------------------------------------------------------------------------------


def test_float_types_round_trip():
    rng = np.random.default_rng(0)
    x = _rows(rng, (48, 320), "t")
    f32 = Q.quantize(x, T.F32)
    assert f32.dtype == np.uint8 and f32.shape == (48, 320 * 4)
    np.testing.assert_array_equal(_decode(f32, T.F32), x)

    f16 = Q.quantize(x, T.F16)
    assert f16.shape == (48, 640)
    np.testing.assert_array_equal(f16.view(np.float16), x.astype(np.float16))
    # fp16 keeps 11 significant bits: relative error <= 2^-11; below 2^-14 it is subnormal with
    # a fixed step of 2^-24, so the absolute error there is <= 2^-25.
    np.testing.assert_allclose(_decode(f16, T.F16), x, rtol=2.0**-11, atol=2.0**-25)

    bf16 = Q.quantize(x, T.BF16)
    assert bf16.shape == (48, 640)
    np.testing.assert_array_equal(bf16, gguf.quants.quantize(x, T.BF16))
    # bf16 keeps 8 significant bits: relative error <= 2^-8 after round-to-nearest
    np.testing.assert_allclose(_decode(bf16, T.BF16), x, rtol=2.0**-8, atol=0)


def test_bf16_rounds_to_nearest_even_and_keeps_nan():
    bits = np.array(
        [
            0x3F808000,  # tie, kept bit even -> down to 0x3F80
            0x3F818000,  # tie, kept bit odd  -> up to 0x3F82
            0x3F808001,  # above the tie      -> up
            0x3F807FFF,  # below the tie      -> down
            0x7F7FFFFF,  # max float -> rounds to inf, as round-to-nearest requires
            0x7FC00001,  # quiet NaN stays NaN
            0x7F800001,  # signalling NaN whose payload sits in the low bits: must not become inf
        ],
        dtype=np.uint32,
    )
    out = Q.quantize(bits.view(np.float32)[None, :], T.BF16).view(np.uint16)[0]
    assert out[:5].tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80]
    assert np.isnan(_decode(out.view(np.uint8), T.BF16)[5:]).all()


# ----------------------------------------------------------------------------------------------
# block types: bytes vs gguf, round trip error, edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q5_1])
@pytest.mark.parametrize("dist", ["normal", "t"])
def test_bytes_match_gguf_package(qtype, dist):
    rng = np.random.default_rng(1)
    x = _rows(rng, (96, 512), dist)
    # Values whose scaled code sits exactly on .5 exercise the rounding rule (Q8_0: roundf,
    # halves away from zero): block = [127, +-k + 0.5 ...] * 2^-7 gives d = 2^-7 exactly.
    x[0, :32] = np.r_[127.0, np.arange(31) - 15.5].astype(np.float32) * np.float32(2.0**-7)
    x[1, :32] = 0.0  # an all-zero block (scale 0 must not divide)
    ours = Q.quantize(x, qtype)
    theirs = gguf.quants.quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("shape", [(1, 256), (37, 768), (4, 3, 512)])
def test_round_trip_error(qtype, shape):
    rng = np.random.default_rng(hash((int(qtype), shape)) % 2**32)
    for dist in ("normal", "t"):
        x = _rows(rng, shape, dist)
        out = Q.quantize(x, qtype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert out.dtype == np.uint8
        assert out.shape == (*shape[:-1], shape[-1] // block * size)
        y = _decode(out, qtype)
        assert y.shape == x.shape
        err = _rel_rmse(x, y)
        assert err < REL_RMSE_BOUND[qtype], (qtype.name, dist, err)


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_degenerate_blocks(qtype):
    x = np.zeros((6, 512), np.float32)
    x[1] = -0.25  # constant negative: min only, scale 0
    x[2] = 0.5  # constant positive
    x[3, ::7] = 3e-3  # mostly zeros
    x[4] = np.linspace(-1, 1, 512, dtype=np.float32)
    x[5, 100] = 1e4  # one huge outlier in an otherwise zero row
    y = _decode(Q.quantize(x, qtype), qtype)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0], 0.0)
    # Every block holds its own extremes, so each row is close in relative terms; constants
    # and single outliers are exactly representable (up to the fp16 scale, 2^-11 relative).
    for row in (1, 2, 5):
        np.testing.assert_allclose(y[row], x[row], rtol=2e-3, atol=0)
    assert _rel_rmse(x[3:5], y[3:5]) < REL_RMSE_BOUND[qtype]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        Q.quantize(np.ones((2, 288), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="NaN or inf"):
        Q.quantize(np.full((2, 32), np.nan, np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="not supported"):
        Q.quantize(np.ones((2, 256), np.float32), T.Q3_K)


# ----------------------------------------------------------------------------------------------
# Q4_K_M type selection
# ----------------------------------------------------------------------------------------------


def test_q4_k_m_rule_table_llama3_8b():
    n = 32  # Llama 3 8B: dim 4096, 8 kv heads of 128, ffn 14336, vocab 128256
    dim, kv, ffn, vocab = 4096, 1024, 14336, 128256
    # use_more_bits: first and last eighth (0-3, 28-31) and every third layer from 4 + 2.
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    assert {i for i in range(n) if Q.use_more_bits(i, n)} == more
    assert Q.q4_k_m_type("token_embd.weight", (vocab, dim), n) == T.Q4_K
    assert Q.q4_k_m_type("token_embd.weight", (vocab, dim), n, tied_embeddings=True) == T.Q6_K
    assert Q.q4_k_m_type("output.weight", (vocab, dim), n) == T.Q6_K
    assert Q.q4_k_m_type("output_norm.weight", (dim,), n) == T.F32
    assert Q.q4_k_m_type("rope_freqs.weight", (64,), n) == T.F32
    for i in range(n):
        big = T.Q6_K if i in more else T.Q4_K
        assert Q.q4_k_m_type(f"blk.{i}.attn_v.weight", (kv, dim), n) == big
        assert Q.q4_k_m_type(f"blk.{i}.ffn_down.weight", (dim, ffn), n) == big
        for name, shape in [
            ("attn_q", (dim, dim)),
            ("attn_k", (kv, dim)),
            ("attn_output", (dim, dim)),
            ("ffn_gate", (ffn, dim)),
            ("ffn_up", (ffn, dim)),
        ]:
            assert Q.q4_k_m_type(f"blk.{i}.{name}.weight", shape, n) == T.Q4_K
        assert Q.q4_k_m_type(f"blk.{i}.attn_norm.weight", (dim,), n) == T.F32
        assert Q.q4_k_m_type(f"blk.{i}.ffn_norm.weight", (dim,), n) == T.F32


def test_q4_k_m_rule_fallbacks_and_70b():
    # Rows not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0 (output goes straight to Q8_0),
    # not even a multiple of 32 -> F16.
    assert Q.q4_k_m_type("blk.5.attn_q.weight", (320, 320), 8) == T.Q5_0
    assert Q.q4_k_m_type("blk.0.ffn_down.weight", (320, 864), 8) == T.Q8_0
    assert Q.q4_k_m_type("blk.1.ffn_down.weight", (320, 864), 8) == T.Q5_0
    assert Q.q4_k_m_type("output.weight", (1000, 320), 8) == T.Q8_0
    assert Q.q4_k_m_type("blk.1.ffn_down.weight", (320, 872), 8) == T.F16
    assert Q.q4_k_m_type("output.weight", (1000, 100), 8) == T.Q8_0  # llama.cpp keeps Q8_0
    # Llama 70B (80 layers, GQA attn_v [1024, 8192]): the Q4_K attn_v layers become Q5_K.
    assert Q.q4_k_m_type("blk.40.attn_v.weight", (1024, 8192), 80) == T.Q5_K
    assert Q.q4_k_m_type("blk.0.attn_v.weight", (1024, 8192), 80) == T.Q6_K
    assert Q.q4_k_m_type("blk.40.attn_v.weight", (8192, 8192), 80) == T.Q4_K  # no GQA (65B)
    assert Q.q4_k_m_type("blk.40.attn_q.weight", (8192, 8192), 80) == T.Q4_K


# ----------------------------------------------------------------------------------------------
# against llama.cpp's own Q4_K_M quantizer
# ----------------------------------------------------------------------------------------------


def _fake_llama(rng, *, n_layers, dim, ffn, n_head, n_kv, vocab, tied, small_rows=False, experts=0):
    """F32 tensors of a llama-shaped model under llama.cpp's tensor names.

    With small_rows the per-layer matrices other than attn_v get 8 rows (llama_model_quantize
    reads only hparams and names, so this keeps an 80-layer model small). With ``experts`` the
    MLP is qwen3moe's: a router (ffn_gate_inp) and stacked experts (ffn_*_exps [E, rows, cols])
    of inner width ``ffn``, plus per-head q/k norms.
    """
    hd = dim // n_head
    tensors = {"token_embd.weight": _rows(rng, (vocab, dim), "t")}
    tensors["token_embd.weight"][3] = 0.0  # a padding embedding: all-zero blocks

    def r(rows: int) -> int:
        return 8 if small_rows else rows

    for i in range(n_layers):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = np.ones(dim, np.float32)
        tensors[p + "attn_q.weight"] = _rows(rng, (r(dim), dim), "normal")
        tensors[p + "attn_k.weight"] = _rows(rng, (r(n_kv * hd), dim), "normal")
        tensors[p + "attn_v.weight"] = _rows(rng, (n_kv * hd, dim), "t")
        tensors[p + "attn_output.weight"] = _rows(rng, (r(dim), dim), "normal")
        tensors[p + "ffn_norm.weight"] = np.ones(dim, np.float32)
        if experts:
            tensors[p + "attn_q_norm.weight"] = np.ones(hd, np.float32)
            tensors[p + "attn_k_norm.weight"] = np.ones(hd, np.float32)
            tensors[p + "ffn_gate_inp.weight"] = _rows(rng, (experts, dim), "normal")
            for leaf, shape in (("gate", (ffn, dim)), ("up", (ffn, dim)), ("down", (dim, ffn))):
                stacked = _rows(rng, (experts * shape[0], shape[1]), "t" if leaf != "gate" else "normal")
                tensors[p + f"ffn_{leaf}_exps.weight"] = stacked.reshape(experts, *shape)
            continue
        tensors[p + "ffn_gate.weight"] = _rows(rng, (r(ffn), dim), "normal")
        tensors[p + "ffn_up.weight"] = _rows(rng, (r(ffn), dim), "t")
        tensors[p + "ffn_down.weight"] = _rows(rng, (r(dim), ffn), "t")
    tensors["output_norm.weight"] = np.ones(dim, np.float32)
    if not tied:
        tensors["output.weight"] = _rows(rng, (vocab, dim), "normal")
    return tensors


def _llama_cpp_q4_k_m(tmp_path, tensors, *, n_layers, dim, ffn, n_head, n_kv, vocab, experts=0):
    """Write the tensors as an F32 GGUF, run llama.cpp's Q4_K_M quantizer, read it back."""
    llama_cpp = llama_cpp_or_skip()
    src, dst = tmp_path / "f32.gguf", tmp_path / "q4_k_m.gguf"
    writer = gguf.GGUFWriter(str(src), "qwen3moe" if experts else "llama")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(ffn)
    writer.add_block_count(n_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(dim // n_head)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0
    reader = gguf.GGUFReader(str(dst))
    return {t.name: (T(t.tensor_type), np.array(t.data).view(np.uint8)) for t in reader.tensors}


MODELS = {
    # 8 layers: the use_more_bits pattern (0, 3, 6, 7); ffn 384 forces the Q5_0 / Q8_0
    # fallbacks on ffn_down.
    "fallbacks": dict(n_layers=8, dim=256, ffn=384, n_head=4, n_kv=2, vocab=320, tied=False),
    # tied embeddings: token_embd takes the output layer's Q6_K.
    "tied": dict(n_layers=3, dim=512, ffn=768, n_head=8, n_kv=2, vocab=300, tied=True),
    # rows that are not even a multiple of 32 (ffn 272): F16.
    "f16": dict(n_layers=2, dim=320, ffn=272, n_head=4, n_kv=2, vocab=300, tied=False),
    # 80 layers with GQA is llama.cpp's "70B": Q5_K for the plain attn_v layers.
    "70b": dict(n_layers=80, dim=256, ffn=256, n_head=4, n_kv=1, vocab=64, tied=False),
    # 80 layers without GQA is "65B": no Q5_K.
    "65b": dict(n_layers=80, dim=256, ffn=256, n_head=4, n_kv=4, vocab=64, tied=False),
    # qwen3moe, 4 experts over 8 layers: the router unquantized, ffn_down_exps as ffn_down
    "moe": dict(n_layers=8, dim=256, ffn=256, n_head=4, n_kv=2, vocab=320, tied=False, experts=4),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_matches_llama_cpp_q4_k_m(tmp_path, model):
    cfg = dict(MODELS[model])
    tied = cfg.pop("tied")
    rng = np.random.default_rng(7)
    tensors = _fake_llama(rng, tied=tied, small_rows=cfg["n_layers"] == 80, **cfg)
    theirs = _llama_cpp_q4_k_m(tmp_path, tensors, **cfg)
    assert set(theirs) == set(tensors)

    identical = total = 0
    seen = set()
    for name, x in tensors.items():
        their_type, their_data = theirs[name]
        ours_type = Q.q4_k_m_type(name, x.shape, cfg["n_layers"], tied_embeddings=tied)
        assert ours_type == their_type, name
        seen.add(ours_type)
        if x.ndim < 2:
            continue
        ours = Q.quantize(x, ours_type)
        assert ours.shape == their_data.shape, name
        # Error: never worse than llama.cpp's beyond float noise. Q4_K/Q5_K/Q6_K follow its
        # search step by step; blocks can still differ where two candidate scales tie to
        # float32 rounding (summation order), and then either choice is as good.
        e_ours = _rel_rmse(x, _decode(ours, ours_type))
        e_theirs = _rel_rmse(x, _decode(their_data, ours_type))
        assert e_ours <= e_theirs * 1.002 + 1e-7, (name, ours_type.name, e_ours, e_theirs)
        block = gguf.GGML_QUANT_SIZES[ours_type][1]
        same = (ours.reshape(-1, block) == their_data.reshape(-1, block)).all(axis=1)
        identical += int(same.sum())
        total += same.size
    # ... and such ties are rare: nearly every block is byte-identical to llama.cpp's.
    assert identical >= 0.99 * total, (identical, total)
    expected = {
        "fallbacks": {T.F32, T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0},
        "tied": {T.F32, T.Q4_K, T.Q6_K},
        "f16": {T.F32, T.Q5_0, T.Q8_0, T.F16},
        "70b": {T.F32, T.Q4_K, T.Q6_K, T.Q5_K},
        "65b": {T.F32, T.Q4_K, T.Q6_K},
        "moe": {T.F32, T.Q4_K, T.Q6_K},
    }[model]
    assert seen == expected


def test_first_absmax_matches_argmax_on_ties_nan_and_zeros():
    """Q6_K's per-column largest-magnitude pick (max/min shortcut) equals the plain first-argmax
    of |a| on the cases the shortcut cannot decide: +x/-x ties in both orders, all zeros, NaN."""
    from tunelab.models.gguf.quants import _first_absmax

    rng = np.random.default_rng(7)
    a = rng.standard_normal((16, 40)).astype(np.float32)
    a[:, 0] = 0.0
    a[[2, 9], 1] = [3.0, -3.0]  # tie, positive first
    a[[1, 5], 2] = [-4.0, 4.0]  # tie, negative first
    a[3, 3] = np.nan
    want = np.take_along_axis(a, np.abs(a).argmax(axis=0)[None, :], axis=0)[0]
    got = _first_absmax(a)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    assert got[1] == 3.0 and got[2] == -4.0
