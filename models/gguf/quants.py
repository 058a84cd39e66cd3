"""GGUF tensor encoders: float formats, ggml block quantizers and llama.cpp's Q4_K_M mix.

One file over the ~600-line guide on purpose: it is one table of ggml formats (each encoder
sits beside the block layout and scale search it must match byte for byte), and splitting it
would separate formats that share their sub-block helpers.

Every encoder takes a float32 array ``[..., cols]`` and returns ``uint8 [..., bytes_per_row]``
laid out byte for byte as ggml stores the type, so ``gguf.quants.dequantize(out, qtype)`` reads
it back and ``GGUFWriter.add_tensor(name, out, raw_dtype=qtype)`` writes it (the writer derives
the element shape from the byte shape). The ``gguf`` package only dequantizes the k-quants, so
the block packing here is written from the format definition (``ggml-common.h``) and checked
against the package's dequantizer in ``tests/export/test_gguf_quants.py``.

Scale search follows llama.cpp's reference quantizers without importance matrix
(``quantize_row_*_ref`` in ``ggml/src/ggml-quants.c``), step for step and in float32:

- Q8_0, Q5_0, Q5_1: one scale (and min) per 32 weights from the block's extremes; the bytes equal
  ``gguf.quants.quantize``, which mirrors llama.cpp.
- Q4_K, Q5_K: per 32-weight sub-block, the min/max grid and then 21 (Q4_K) / 16 (Q5_K)
  stretched grids, each with a least-squares scale and min under weights ``rms(x) + |x|``
  (``make_qkx2_quants``); the 8 scales and 8 mins are then coded in 6 bits against two fp16
  super-block factors and every weight is re-coded against the decoded scales.
- Q6_K: per 16-weight sub-block, the symmetric scale among 19 grids that fits best under
  weights ``x^2`` (``make_qx_quants``, ``rmse_type=1``); 16 int8 scales against one fp16 factor.

The searches are vectorised over all sub-blocks of a chunk of rows (the candidates are walked
in llama.cpp's order, since an accepted Q4_K/Q5_K min shifts the later grids). The result is
byte-identical to llama.cpp's for all but a fraction of a percent of the Q6_K blocks, where
two candidates tie to float32 rounding (summation order) and either is as good; the tests
compare against llama.cpp's own ``llama_model_quantize``. Chunks run on a thread pool; each
candidate grid costs about a dozen float32 passes over the chunk, so the k-quants run at tens
of millions of weights per second per core (``bench/gguf_quant_speed.py``, figures in
``bench/results/gguf_cpu.jsonl``), F16 / BF16 at memory speed through torch.

Q4_K_M mix (:func:`q4_k_m_type`), read from llama.cpp ``src/llama-quant.cpp``
(``llama_tensor_get_type_impl`` and ``tensor_type_fallback``, vendored in llama-cpp-python
0.3.36, llama.cpp commit 0c1e570, Oct 2026), for dense llama-architecture models:

- 1-D tensors, names not ending in ``weight``, and ``*_norm.weight``: not quantized (F32).
- ``output.weight`` (and ``token_embd.weight`` when the embeddings are tied, i.e. the file has
  no ``output.weight``): Q6_K, or Q8_0 when ``cols % 256 != 0``.
- ``blk.{i}.attn_v.weight`` and ``blk.{i}.ffn_down.weight``: Q6_K when ``use_more_bits(i, n)``,
  else Q4_K, where ``use_more_bits(i, n) = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2``
  (the first and last eighth of the layers and every third layer in between).
- Llama 70B (80 layers with grouped-query attention): ``attn_v`` that would be Q4_K becomes Q5_K.
  llama.cpp knows GQA from ``n_head != n_head_kv``; here it is read from the attn_v shape
  (fewer rows than columns), which is the same thing for Llama's ``n_head * head_dim == dim``.
- Everything else that is 2-D (``token_embd`` untied, ``attn_q``, ``attn_k``, ``attn_output``,
  ``ffn_gate``, ``ffn_up``): Q4_K.
- Fallback when ``cols`` is not a multiple of the chosen type's block (256 for k-quants):
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; if ``cols % 32 != 0`` as well: F16.
- Mixture-of-experts files (qwen3moe): the router ``ffn_gate_inp`` is never quantized (F32, as
  llama.cpp's converter writes it); the stacked experts follow the names above, ``ffn_down_exps``
  as ``ffn_down`` (llama.cpp matches by substring and reads the layer from the name) and
  ``ffn_gate_exps`` / ``ffn_up_exps`` Q4_K. Not covered: llama.cpp's extra bits for models
  with exactly 8 experts (``attn_v``/``attn_k`` Q8_0); such a file is refused.
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

__all__ = [
    "SUPPORTED_TYPES",
    "quantize",
    "quantize_q4_k",
    "quantize_q5_0",
    "quantize_q5_1",
    "quantize_q5_k",
    "quantize_q6_k",
    "quantize_q8_0",
    "q4_k_m_type",
    "use_more_bits",
]

T = GGMLQuantizationType

# Rows are encoded a chunk at a time so the search temporaries (a handful of arrays the size
# of the chunk) stay in cache instead of growing with the tensor; 2^18 weights (1 MB) measured
# fastest (2^16: -15%, 2^20: -30% for Q4_K).
_CHUNK_ELEMENTS = 1 << 18

#: Upper bound on encoder threads (each holds a few MB of search temporaries).
MAX_THREADS = 8


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check(array: np.ndarray, block: int, name: str) -> np.ndarray:
    """float32, C-contiguous, at least 1-D, last dim a multiple of ``block``."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    if array.shape[-1] % block != 0:
        raise ValueError(
            f"{name}: row length {array.shape[-1]} is not a multiple of the block size {block}"
        )
    return array


def _by_chunks(array: np.ndarray, block: int, type_size: int, encode) -> np.ndarray:
    """Run ``encode(blocks [n, block]) -> uint8 [n, type_size]`` over ``array`` chunk by chunk.

    Chunks are independent, and numpy releases the GIL inside its array loops, so they are
    spread over a thread pool (one thread per core, at most :data:`MAX_THREADS`).

    Args:
        array: float32 ``[..., cols]`` with ``cols % block == 0``.
        block: weights per block.
        type_size: bytes per encoded block.
        encode: the block encoder.

    Returns:
        uint8 ``[..., cols // block * type_size]``.
    """
    shape = array.shape
    blocks = array.reshape(-1, block)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // block)
    starts = range(0, blocks.shape[0], step)

    def run(start: int) -> None:
        out[start : start + step] = encode(blocks[start : start + step])

    threads = min(MAX_THREADS, os.cpu_count() or 1, len(starts))
    if threads <= 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, starts))  # list() re-raises a worker's exception here
    return out.reshape(*shape[:-1], shape[-1] // block * type_size)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """[n] or [n, 1] float32 -> uint8 [n, 2]: IEEE half, round to nearest even like ggml."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: halves go away from zero (np.rint would round them to even).

    ``floor(|x| + 0.5)`` is not exact (``0.49999997 + 0.5`` rounds up to 1 in float32), so the
    fractional part is compared instead; it is exact for |x| < 2**23.
    """
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), x)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` (the 1.5 * 2**23 trick): round half to even, i.e. ``np.rint``."""
    return np.rint(x)


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0x0F) | (hi.astype(np.uint8) << 4)


# ----------------------------------------------------------------------------------------------
# float formats
# ----------------------------------------------------------------------------------------------


def _quantize_f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint8)


def _torch_convert(array: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """float32 array -> (the same array, uint16 bits of its ``dtype`` (f16 / bf16) conversion).

    torch converts with vector instructions, rounding to nearest even on every value but NaN
    (subnormals and overflow to inf included), as numpy's ``astype(float16)`` and ggml's bf16
    do. The output buffer comes from numpy, which asks the kernel for huge pages on large
    arrays: faulting in a fresh torch allocation page by page cost several times the
    conversion itself.
    """
    x = np.ascontiguousarray(array, dtype=np.float32)
    bits = np.empty(x.shape, dtype=np.uint16)
    if x.flags.writeable:
        src = torch.from_numpy(x)
    else:
        # torch warns that it cannot protect a read-only buffer (e.g. a memory-mapped
        # checkpoint); it is only read here, and copying it would cost a pass.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(x)
    torch.from_numpy(bits.view(np.int16)).view(dtype).copy_(src)
    return x, bits


def _has_nan(x: np.ndarray) -> bool:
    # max propagates NaN: one reduction pass, no temporary (np.isnan(x).any() writes a mask).
    return x.size > 0 and bool(np.isnan(x.max()))


def _quantize_f16(array: np.ndarray) -> np.ndarray:
    x, bits = _torch_convert(array, torch.float16)
    if _has_nan(x):  # NaNs as numpy (and gguf's own converter) write them, payload kept
        nan = np.isnan(x)
        bits[nan] = x[nan].astype(np.float16).view(np.uint16)
    return bits.view(np.uint8)


def _quantize_bf16(array: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bytes, rounded to nearest even like ggml; NaNs as ggml writes them.

    torch's rounding is the same as ggml's (add ``0x7fff`` plus the lowest kept bit, shift),
    which ``gguf.quants`` mirrors. For a NaN ggml keeps the sign and the top payload bits and
    forces it quiet (rounding could carry the payload into the exponent: NaN -> inf); torch
    writes its own NaN, so NaNs are patched.
    """
    x, bits = _torch_convert(array, torch.bfloat16)
    if _has_nan(x):
        nan = np.isnan(x)
        bits[nan] = ((x.view(np.uint32)[nan] >> 16) | 0x40).astype(np.uint16)
    return bits.view(np.uint8)


# ----------------------------------------------------------------------------------------------
# 32-weight block types
# ----------------------------------------------------------------------------------------------


def _q8_0_blocks(x: np.ndarray) -> np.ndarray:
    # block_q8_0, 34 bytes / 32 weights:
    #   [0:2]   d   fp16     x[j] = d * qs[j]
    #   [2:34]  qs  int8[32]
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_half_away(x * inv).astype(np.int8)
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)


def quantize_q8_0(array: np.ndarray) -> np.ndarray:
    """Q8_0: 8-bit weights, one fp16 scale per 32 (8.5 bits per weight).

    Args:
        array: float32 ``[..., cols]``, ``cols % 32 == 0``.

    Returns:
        uint8 ``[..., cols // 32 * 34]``, identical to ``quantize_row_q8_0_ref``.
    """
    array = _check(array, 32, "Q8_0")
    return _by_chunks(array, 32, 34, _q8_0_blocks)


def _pack_5bit_32(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """5-bit codes [n, 32] -> (qh uint8 [n, 4], qs uint8 [n, 16]).

    qh is a little-endian uint32 whose bit j is bit 4 of weight j; qs[j] holds the low nibbles
    of weights j (low half of the byte) and j + 16 (high half).
    """
    qs = _pack_nibbles(q[:, :16], q[:, 16:])
    qh = np.packbits((q >> 4).astype(np.uint8) & 1, axis=1, bitorder="little")
    return qh, qs


def _q5_0_blocks(x: np.ndarray) -> np.ndarray:
    # block_q5_0, 22 bytes / 32 weights:
    #   [0:2]   d   fp16        x[j] = d * (q[j] - 16), q 5-bit unsigned
    #   [2:6]   qh  uint32      bit j = bit 4 of q[j]
    #   [6:22]  qs  uint8[16]   qs[j] = q[j] & 15 | (q[j + 16] & 15) << 4
    # The signed extreme maps to -16 exactly, so the asymmetric range [-16, 15] loses nothing
    # on the side that holds the largest magnitude.
    idx = np.abs(x).argmax(axis=1)[:, None]
    extreme = np.take_along_axis(x, idx, axis=1)
    d = extreme / np.float32(-16)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    # C truncates (int8_t)(v + 16.5f); v + 16.5 >= 0.5 here, so trunc == floor.
    q = np.minimum(np.trunc(x * inv + np.float32(16.5)), 31).astype(np.uint8)
    qh, qs = _pack_5bit_32(q)
    return np.concatenate([_fp16_bytes(d), qh, qs], axis=1)


def quantize_q5_0(array: np.ndarray) -> np.ndarray:
    """Q5_0: symmetric 5-bit weights, one fp16 scale per 32 (5.5 bits per weight).

    llama.cpp's fallback for Q4_K tensors whose rows are not a multiple of 256.

    Args:
        array: float32 ``[..., cols]``, ``cols % 32 == 0``.

    Returns:
        uint8 ``[..., cols // 32 * 22]``, identical to ``quantize_row_q5_0_ref``.
    """
    array = _check(array, 32, "Q5_0")
    return _by_chunks(array, 32, 22, _q5_0_blocks)


def _q5_1_blocks(x: np.ndarray) -> np.ndarray:
    # block_q5_1, 24 bytes / 32 weights:
    #   [0:2]   d   fp16        x[j] = d * q[j] + m, q 5-bit unsigned
    #   [2:4]   m   fp16
    #   [4:8]   qh  uint32      bit j = bit 4 of q[j]
    #   [8:24]  qs  uint8[16]   as Q5_0
    lo = x.min(axis=1, keepdims=True)
    hi = x.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(31)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.minimum(np.trunc((x - lo) * inv + np.float32(0.5)), 31).astype(np.uint8)
    qh, qs = _pack_5bit_32(q)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), qh, qs], axis=1)


def quantize_q5_1(array: np.ndarray) -> np.ndarray:
    """Q5_1: 5-bit weights with a scale and an offset per 32 (6 bits per weight).

    llama.cpp's fallback for Q5_K tensors whose rows are not a multiple of 256.

    Args:
        array: float32 ``[..., cols]``, ``cols % 32 == 0``.

    Returns:
        uint8 ``[..., cols // 32 * 24]``, identical to ``quantize_row_q5_1_ref``.
    """
    array = _check(array, 32, "Q5_1")
    return _by_chunks(array, 32, 24, _q5_1_blocks)


# ----------------------------------------------------------------------------------------------
# k-quants (256-weight super-blocks)
# ----------------------------------------------------------------------------------------------


# Per-column dot product of two [rows, n] arrays. numpy's einsum adds the row products in row
# order, each product rounded to float32 first (no fused multiply-add), like the C loops it
# mirrors; a BLAS call or torch's reductions would sum in another order.
_COLUMN_DOT = "ij,ij->j"


def _fit_scale_min(
    xt: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and min of asymmetric 32-weight sub-blocks: llama.cpp's ``make_qkx2_quants``.

    Start from the sub-block's [min(x, 0), max(x)] range cut into ``nmax`` steps. Then try
    ``nstep + 1`` grids of ``nmax + rmin + rdelta * k`` steps over the current range; for each
    grid's codes, solve the scale and min minimising ``sum w (scale * code + min - x)^2``
    (2x2 normal equations) and keep it when the error drops. As in llama.cpp, an accepted min
    moves the range the later grids are laid on, so the candidates are walked in order. Weights
    are ``rms(x) + |x|``: large weights matter more, small ones are not ignored.

    The layout is transposed (``[32, n]``, one sub-block per column) because numpy broadcasts a
    per-sub-block scalar along the fast axis several times faster that way, and reduces over
    the 32 rows without strided access.

    Args:
        xt: float32 ``[32, n]``, column j = sub-block j.
        nmax: largest code (15 for Q4_K, 31 for Q5_K).
        rmin, rdelta, nstep: the candidate grids (Q4_K: -1, 0.1, 20; Q5_K: -0.5, 0.1, 15).

    Returns:
        ``(scale [n], neg_min [n])`` with ``x ~= scale * code - neg_min`` and ``neg_min >= 0``
        (the offset is never positive); the caller recomputes the codes after rounding the
        scales to 6 bits.
    """
    f32 = np.float32
    w = np.sqrt(np.einsum(_COLUMN_DOT, xt, xt) / f32(32)) + np.abs(xt)  # [32, n]
    lo = np.minimum(xt.min(axis=0), f32(0))  # [n]
    hi = xt.max(axis=0)
    flat = hi == lo  # all equal and <= 0: scale 0, the offset carries the value
    sum_w = w.sum(axis=0)
    sum_x = np.einsum(_COLUMN_DOT, w, xt)
    # Two [32, n] work buffers reused by every candidate (the weighted codes and the residual
    # take turns in `work`): fresh temporaries cost a page-in each, and fewer live arrays stay
    # in cache. Every value is still computed by the same float32 operations in the same order.
    codes = np.empty_like(xt)
    work = np.empty_like(xt)
    top, bottom = f32(nmax), f32(0)

    def error(scale, offset):
        np.multiply(codes, scale, out=work)
        np.add(work, offset, out=work)
        np.subtract(work, xt, out=work)
        np.multiply(work, work, out=work)
        return np.einsum(_COLUMN_DOT, w, work)

    with np.errstate(divide="ignore", invalid="ignore"):
        span = np.where(flat, f32(1), hi - lo)
        iscale = top / span
        scale = f32(1) / iscale
        np.subtract(xt, lo, out=codes)
        np.multiply(codes, iscale, out=codes)
        np.rint(codes, out=codes)
        np.minimum(codes, top, out=codes)
        best = error(scale, lo)
        for k in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(k) + top) / (hi - lo)
            np.subtract(xt, lo, out=codes)
            np.multiply(codes, iscale, out=codes)
            np.rint(codes, out=codes)
            np.clip(codes, bottom, top, out=codes)
            wl = np.multiply(w, codes, out=work)
            sum_l = wl.sum(axis=0)
            sum_l2 = np.einsum(_COLUMN_DOT, wl, codes)
            sum_xl = np.einsum(_COLUMN_DOT, wl, xt)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            # A positive offset cannot be stored (mins are subtracted); refit the scale alone.
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, f32(0), this_min)
            cur = error(this_scale, this_min)
            take = (det > 0) & (cur < best)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            lo = np.where(take, this_min, lo)
    scale = np.where(flat, f32(0), scale)
    return scale.astype(f32), (-lo).astype(f32)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] -> the 12-byte ``scales`` field of Q4_K / Q5_K.

    Byte layout (``get_scale_min_k4``; sN / mN = scale / min of sub-block N):
        bytes 0-3:   s0..s3 in bits 0-5, bits 4-5 of s4..s7 in bits 6-7
        bytes 4-7:   m0..m3 in bits 0-5, bits 4-5 of m4..m7 in bits 6-7
        bytes 8-11:  low nibble of s4..s7 | low nibble of m4..m7 << 4
    """
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return np.concatenate(
        [
            lo_s | ((hi_s >> 4) << 6),
            lo_m | ((hi_m >> 4) << 6),
            (hi_s & 0x0F) | ((hi_m & 0x0F) << 4),
        ],
        axis=1,
    )


def _k_asym_codes(
    x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shared Q4_K / Q5_K body: search, 6-bit scale coding, final codes.

    Args:
        x: float32 ``[nb, 256]`` super-blocks.

    Returns:
        ``(head uint8 [nb, 16], codes uint8 [nb, 256])`` where head = d, dmin, scales, and
        ``x ~= d * s_j * code - dmin * m_j`` per 32-weight sub-block j.
    """
    f32 = np.float32
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # [32, nb * 8]
    scale, neg_min = _fit_scale_min(sub, nmax, rmin, rdelta, nstep)
    scale = scale.reshape(nb, 8)
    neg_min = neg_min.reshape(nb, 8)
    # The super-block stores the largest scale / min; the 8 sub-block values become 6-bit
    # fractions of them (llama.cpp clamps both maxima at 0: scales and mins are never negative).
    max_scale = np.maximum(scale.max(axis=1, keepdims=True), f32(0))
    max_min = np.maximum(neg_min.max(axis=1, keepdims=True), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.clip(_nearest_int(inv_scale * scale), 0, 63)
    lm = np.clip(_nearest_int(inv_min * neg_min), 0, 63)
    d16 = (max_scale / f32(63)).astype(np.float16)
    dmin16 = (max_min / f32(63)).astype(np.float16)

    # Re-code every weight against the scales as they will be decoded (fp16 x 6-bit), so the
    # rounding of the scales is absorbed instead of compounded.
    d = (d16.astype(f32) * ls)[:, :, None]  # [nb, 8, 1]
    dm = (dmin16.astype(f32) * lm)[:, :, None]
    xs = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((xs + dm) / d), 0, nmax)
    # A zero scale decodes every code to -dmin * m_j; store code 0 there.
    codes = np.where(d != 0, requant, f32(0)).astype(np.uint8)
    head = np.concatenate(
        [d16.view(np.uint8), dmin16.view(np.uint8), _pack_k_scales(ls, lm)], axis=1
    )
    return head, codes.reshape(nb, 256)


def _pack_k_low_nibbles(codes: np.ndarray) -> np.ndarray:
    """[nb, 256] codes -> qs [nb, 128]: per 64 weights, 32 bytes of (w[l] | w[l + 32] << 4)."""
    c = codes.reshape(-1, 4, 2, 32)
    return _pack_nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    # block_q4_K, 144 bytes / 256 weights (8 sub-blocks of 32):
    #   [0:2]     d       fp16       x = d * s_j * q - dmin * m_j, q 4-bit unsigned
    #   [2:4]     dmin    fp16
    #   [4:16]    scales  6-bit s_j, m_j (see _pack_k_scales)
    #   [16:144]  qs      for c in 0..3: 32 bytes, q[64c + l] | q[64c + 32 + l] << 4
    head, codes = _k_asym_codes(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    return np.concatenate([head, _pack_k_low_nibbles(codes)], axis=1)


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """Q4_K: 4-bit weights, 6-bit scale and min per 32, fp16 factors per 256 (4.5 bpw).

    Args:
        array: float32 ``[..., cols]``, ``cols % 256 == 0``.

    Returns:
        uint8 ``[..., cols // 256 * 144]``.
    """
    array = _check(array, QK_K, "Q4_K")
    return _by_chunks(array, QK_K, 144, _q4_k_blocks)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    # block_q5_K, 176 bytes / 256 weights (8 sub-blocks of 32):
    #   [0:2]     d       fp16       x = d * s_j * q - dmin * m_j, q 5-bit unsigned
    #   [2:4]     dmin    fp16
    #   [4:16]    scales  6-bit s_j, m_j (see _pack_k_scales)
    #   [16:48]   qh      qh[l] bit i = bit 4 of q[32i + l]
    #   [48:176]  qs      low nibbles, as Q4_K
    head, codes = _k_asym_codes(x, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    high = (codes.reshape(-1, 8, 32) >> 4) & 1  # [nb, i, l]
    qh = np.packbits(high.transpose(0, 2, 1), axis=2, bitorder="little")[:, :, 0]  # [nb, 32]
    return np.concatenate([head, qh, _pack_k_low_nibbles(codes & 0x0F)], axis=1)


def quantize_q5_k(array: np.ndarray) -> np.ndarray:
    """Q5_K: 5-bit weights, 6-bit scale and min per 32, fp16 factors per 256 (5.5 bpw).

    Used by the Q4_K_M mix only for Llama-70B-shaped attn_v tensors.

    Args:
        array: float32 ``[..., cols]``, ``cols % 256 == 0``.

    Returns:
        uint8 ``[..., cols // 256 * 176]``.
    """
    array = _check(array, QK_K, "Q5_K")
    return _by_chunks(array, QK_K, 176, _q5_k_blocks)


def _first_absmax(a: np.ndarray) -> np.ndarray:
    """Per column of ``a`` [rows, n], the signed entry of largest magnitude; on a tie, the
    first in row order (``take_along_axis(a, abs(a).argmax(0))``, which C's ``>`` scan gives).

    numpy's argmax along the slow axis is several times slower than a max and a min, which decide
    every column but the rare ones whose max and min have equal magnitude (or NaN, or all
    zeros); only those are scanned with argmax.
    """
    hi = a.max(axis=0)
    lo = a.min(axis=0)
    # hi > -lo: only entries equal to hi reach that magnitude; hi < -lo: only entries = lo.
    pos = hi > -lo
    out = np.where(pos, hi, lo)
    unsure = np.flatnonzero(~(pos | (hi < -lo)))
    if unsure.size:
        sub = a[:, unsure]
        out[unsure] = np.take_along_axis(sub, np.abs(sub).argmax(axis=0)[None, :], axis=0)[0]
    return out


def _fit_symmetric(xt: np.ndarray) -> np.ndarray:
    """Scale of symmetric 16-weight sub-blocks: llama.cpp's ``make_qx_quants(rmse_type=1)``.

    The weight of largest magnitude is put on code -32 (``nmax + 0.1 k`` steps for
    k = 0, -9..-1, 1..9); for each grid the codes get the least-squares scale under weights
    ``x^2``, and the grid whose fit removes the most weighted energy
    (``sum(w x l)^2 / sum(w l^2)``) wins; the comparison is walked in llama.cpp's order so
    ties resolve alike.

    Args:
        xt: float32 ``[16, n]``, column j = sub-block j (transposed for fast broadcasting).

    Returns:
        float32 ``[n]`` scales (negative when the extreme weight is positive); 0 for an
        all-zero sub-block.
    """
    f32 = np.float32
    nmax = f32(32)
    extreme = _first_absmax(xt)  # signed, maps to code -32
    zero = np.abs(extreme) < f32(1e-15)
    extreme = np.where(zero, f32(1), extreme)
    w = xt * xt  # llama.cpp's rmse_type=1 weights
    wx = w * xt
    codes = np.empty_like(xt)  # reused by every candidate (see _fit_scale_min)

    def moments(iscale):
        np.multiply(xt, iscale, out=codes)
        np.rint(codes, out=codes)
        np.clip(codes, -nmax, nmax - 1, out=codes)
        sum_lx = np.einsum(_COLUMN_DOT, wx, codes)
        np.multiply(codes, codes, out=codes)
        return sum_lx, np.einsum(_COLUMN_DOT, w, codes)

    with np.errstate(divide="ignore", invalid="ignore"):
        sum_lx, sum_l2 = moments(-nmax / extreme)
        scale = np.where(sum_l2 > 0, sum_lx / sum_l2, f32(0))
        best = scale * sum_lx
        for k in (*range(-9, 0), *range(1, 10)):
            sum_lx, sum_l2 = moments(-(nmax + f32(0.1) * f32(k)) / extreme)
            take = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            scale = np.where(take, sum_lx / sum_l2, scale)
            best = np.where(take, scale * sum_lx, best)
    return np.where(zero, f32(0), scale).astype(f32)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    # block_q6_K, 210 bytes / 256 weights (16 sub-blocks of 16):
    #   [0:128]    ql      for h in 0..1, l in 0..31 (L = q + 32, 6-bit):
    #                        ql[64h + l]      = L[128h + l]      & 15 | (L[128h + l + 64] & 15) << 4
    #                        ql[64h + 32 + l] = L[128h + l + 32] & 15 | (L[128h + l + 96] & 15) << 4
    #   [128:192]  qh      qh[32h + l] = bits 4-5 of L[128h + l + 32k] at bits 2k..2k+1, k 0..3
    #   [192:208]  scales  int8 s_j
    #   [208:210]  d       fp16      x = d * s_j * q, q in [-32, 31]
    f32 = np.float32
    nb = x.shape[0]
    scale = _fit_symmetric(np.ascontiguousarray(x.reshape(nb * 16, 16).T)).reshape(nb, 16)

    # Super-block: the signed scale of largest magnitude maps to int8 -128, so the sign of
    # the scales uses the full int8 range.
    max_scale = _first_absmax(scale.T)[:, None]  # [nb, 1]
    zero = np.abs(max_scale) < f32(1e-15)
    inv = np.where(zero, f32(0), f32(-128) / np.where(zero, f32(1), max_scale))
    d16 = np.where(zero, f32(0), f32(1) / np.where(zero, f32(1), inv)).astype(np.float16)
    qscale = np.minimum(_nearest_int(inv * scale), 127).astype(np.int8)  # [nb, 16]

    d = d16.astype(f32) * qscale  # [nb, 16]
    xs = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(xs / d[:, :, None]), -32, 31) + 32
    # A zero sub-block scale decodes every code to 0; store code 0 (L = 32) there.
    L = np.where(d[:, :, None] != 0, requant, f32(32)).astype(np.uint8)
    L = np.where(zero[:, :, None], np.uint8(0), L).reshape(nb, 2, 4, 32)  # [nb, h, k, l]

    ql = np.concatenate(
        [_pack_nibbles(L[:, :, 0], L[:, :, 2]), _pack_nibbles(L[:, :, 1], L[:, :, 3])], axis=2
    ).reshape(nb, 128)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    qh = qh.reshape(nb, 64)
    # An all-zero super-block is stored as all-zero bytes (d = 0), as llama.cpp does.
    qscale = np.where(zero, np.int8(0), qscale)
    return np.concatenate([ql, qh, qscale.view(np.uint8), d16.view(np.uint8)], axis=1)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """Q6_K: 6-bit symmetric weights, int8 scale per 16, fp16 factor per 256 (6.5625 bpw).

    Args:
        array: float32 ``[..., cols]``, ``cols % 256 == 0``.

    Returns:
        uint8 ``[..., cols // 256 * 210]``.
    """
    array = _check(array, QK_K, "Q6_K")
    return _by_chunks(array, QK_K, 210, _q6_k_blocks)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------

_ENCODERS = {
    T.F32: _quantize_f32,
    T.F16: _quantize_f16,
    T.BF16: _quantize_bf16,
    T.Q8_0: quantize_q8_0,
    T.Q5_0: quantize_q5_0,
    T.Q5_1: quantize_q5_1,
    T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k,
    T.Q6_K: quantize_q6_k,
}

#: The types :func:`quantize` encodes.
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_ENCODERS)


def quantize(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Encode a float tensor as ``qtype`` in ggml's byte layout.

    Args:
        array: ``[..., cols]`` floats (any float dtype; computed in float32). For block types
            ``cols`` must be a multiple of the block size (32, or 256 for k-quants).
        qtype: one of :data:`SUPPORTED_TYPES` (F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K,
            Q6_K).

    Returns:
        uint8 ``[..., bytes_per_row]`` (for F32/F16/BF16 the raw little-endian element bytes),
        ready for ``GGUFWriter.add_tensor(name, out, raw_dtype=qtype)``.

    Raises:
        ValueError: unsupported type, a row length the type cannot hold, or NaN / inf values
            for a block type.
    """
    qtype = GGMLQuantizationType(qtype)
    encoder = _ENCODERS.get(qtype)
    if encoder is None:
        names = ", ".join(t.name for t in _ENCODERS)
        raise ValueError(f"GGUF type {qtype.name} is not supported; use one of {names}")
    block = GGML_QUANT_SIZES[qtype][0]
    array = _check(np.asarray(array), block, qtype.name)
    if block > 1 and not np.isfinite(array).all():
        # One NaN/inf would poison its whole block's scale; better to stop than to write it.
        raise ValueError(f"{qtype.name}: the tensor holds NaN or inf values")
    return encoder(array)


# ----------------------------------------------------------------------------------------------
# Q4_K_M type selection
# ----------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^blk\.(\d+)\.")

# Types whose block does not fit the row -> llama.cpp's replacement (tensor_type_fallback).
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the *_M mixes.

    The first and last eighth of the layers, plus every third layer in between.

    Args:
        layer: 0-based block index.
        n_layers: number of blocks in the model.
    """
    return (
        layer < n_layers // 8
        or layer >= 7 * n_layers // 8
        or (layer - n_layers // 8) % 3 == 2
    )


def _fit_row(qtype: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    # A row that is not even a multiple of 32 fits no block type: keep it as F16.
    return qtype if cols % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def q4_k_m_type(
    name: str,
    shape: tuple[int, ...],
    n_layers: int,
    *,
    tied_embeddings: bool = False,
) -> GGMLQuantizationType:
    """The ggml type llama.cpp's ``Q4_K_M`` mix gives a llama tensor (rule in the module doc).

    Args:
        name: GGUF tensor name, e.g. ``"blk.3.attn_v.weight"``, ``"output.weight"``.
        shape: the tensor's shape as numpy/torch order, ``(rows, cols)``; ``cols`` (the last
            dim, ggml's ``ne[0]``) decides the fallbacks.
        n_layers: number of transformer blocks in the model.
        tied_embeddings: the file has no ``output.weight`` and ``token_embd.weight`` doubles as
            the output layer; llama.cpp then gives the embedding the output layer's type.

    Returns:
        The GGMLQuantizationType to pass to :func:`quantize`.
    """
    if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return T.F32
    cols = int(shape[-1])
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        # Checked before the generic fallback: llama.cpp goes straight to Q8_0 here.
        return T.Q6_K if cols % QK_K == 0 else T.Q8_0

    qtype = T.Q4_K
    match = _LAYER.match(name)
    if match is not None and ("attn_v.weight" in name or "attn_qkv.weight" in name):
        layer = int(match.group(1))
        if use_more_bits(layer, n_layers):
            qtype = T.Q6_K
        elif n_layers == 80 and int(shape[0]) < cols:
            # Llama 70B: attn_v is 8x smaller than attn_q (GQA), so 5 bits cost little.
            qtype = T.Q5_K
    elif match is not None and "ffn_down" in name:
        if use_more_bits(int(match.group(1)), n_layers):
            qtype = T.Q6_K
    return _fit_row(qtype, cols)
