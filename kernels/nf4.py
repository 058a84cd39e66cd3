"""NF4 dequantization: packed 4-bit codes + double-quantized block scales -> dense weight.

The storage layout is bitsandbytes' (``quantize_4bit(..., quant_type="nf4",
compress_statistics=True)``), so the same function reads weights we quantized and weights from
pre-quantized HF checkpoints. For element ``i`` of the flattened weight::

    nibble   = codes[i // 2] >> 4          if i is even (high nibble first)
             = codes[i // 2] & 0xF         if i is odd
    b        = i // block_size             (64-element block)
    absmax_b = absmax_code[absmax_q[b]] * absmax_scale[b // scaler_block_size] + absmax_offset
    w[i]     = code[nibble] * absmax_b     (fp32, then cast to the output dtype)

``code`` is the 16-entry NF4 code book, ``absmax_code`` the 256-entry signed dynamic 8-bit map
used for the block scales. The arithmetic (fp32 multiply, then add the offset, then multiply)
is bitsandbytes' own, so the reference reproduces its dequantized values exactly.

The Triton kernel is a single pass that reads 0.5 byte and writes 2 bytes (bf16) per weight,
which is what bounds it on a GPU. One program dequantizes ``_BYTES // (block_size // 2)`` whole
blocks (64 blocks of 64 weights: 2048 packed bytes, 4096 outputs) as a ``[blocks, block_size // 2]``
byte tile, so each block's scale is computed once and broadcast over its row instead of gathered
per byte; the packed codes are loaded evict-first and the outputs stored cache-streaming (each
byte is touched once, and an 8B model's weights are far larger than L2). That design measured
3,650 GB/s on an H200 against 3,232 GB/s for the earlier one-byte-per-lane kernel
(bench/nf4_variants.py, variant ``tile_cs_k64_w4``; 3,632 GB/s as shipped, in
bench/nf4_dequant.py's ``bytes2048_warps4``). ``tl.arange`` needs power-of-two lengths,
so a ``block_size`` whose half is not a power of two runs that earlier kernel instead
(``_dequantize_nf4_flat_kernel``).

The kernels are compiled without fp multiply-add fusion, so the block scale is rounded twice,
as the reference and bitsandbytes round it, and on a GPU the output is bit-identical to the
reference's (Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest).
"""

from __future__ import annotations

import torch

from tunelab.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["dequantize_nf4", "dequantize_nf4_reference", "dequantize_absmax_reference"]

_BYTES = 2048  # packed bytes per Triton program: 64 blocks of 64 weights (4096 outputs)
_WARPS = 4  # with _BYTES, the fastest launch shape of bench/nf4_variants.py on an H200


def dequantize_absmax_reference(
    absmax_q: torch.Tensor,
    absmax_code: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    scaler_block_size: int,
) -> torch.Tensor:
    """The fp32 per-block scales from their 8-bit codes: ``code[q] * scale[block] + offset``."""
    nb = absmax_q.numel()
    vals = absmax_code[absmax_q.long()]  # [nb] fp32 in [-1, 1]
    scale = absmax_scale.repeat_interleave(scaler_block_size)[:nb]
    return vals * scale + absmax_offset  # two roundings, as bitsandbytes does


def dequantize_nf4_reference(
    codes: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor,
    *,
    numel: int,
    block_size: int,
    scaler_block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """PyTorch dequantization (the oracle and the CPU path); returns a flat [numel] tensor.

    Args:
        codes: uint8 [ceil(numel / 2)], two 4-bit codes per byte, high nibble first.
        absmax_q: uint8 [ceil(numel / block_size)], 8-bit codes of ``absmax - offset``.
        absmax_scale: fp32 [ceil(n_blocks / scaler_block_size)], one scale per 256 blocks.
        absmax_offset: fp32 scalar, the mean absmax subtracted before quantizing.
        code: fp32 [16], the NF4 code book.
        absmax_code: fp32 [256], the signed dynamic map of the block scales.
        numel: number of weights.
        block_size: weights per absmax (64).
        scaler_block_size: absmax values per scale (256).
        dtype: output dtype.
    """
    absmax = dequantize_absmax_reference(absmax_q, absmax_code, absmax_scale, absmax_offset, scaler_block_size)
    # one lookup per byte: a 256-row table of (high nibble's level, low nibble's level)
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)  # [256, 2]
    vals = pairs[codes.long()].reshape(-1)  # [2 * n_bytes]
    n_blocks = absmax.numel()
    padded = n_blocks * block_size
    if vals.numel() < padded:  # the last block is short: pad so every block is a row
        vals = torch.cat([vals, vals.new_zeros(padded - vals.numel())])
    out = (vals[:padded].view(n_blocks, block_size) * absmax[:, None]).reshape(-1)  # [n_blocks * bs]
    return out[:numel].to(dtype)


if HAS_TRITON:

    @triton.jit
    def _block_absmax(ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, ABSMAX_CODE, block, mask,
                      SCALER_BLOCK_SIZE: tl.constexpr):
        # the double-quantized scale of each block in ``block``: code[q] * scale + offset
        q = tl.load(ABSMAX_Q + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(ABSMAX_SCALE + block // SCALER_BLOCK_SIZE, mask=mask, other=0.0)
        return tl.load(ABSMAX_CODE + q) * scale + tl.load(ABSMAX_OFFSET)

    @triton.jit
    def _nf4_values(CODE, packed, absmax):
        # both nibbles of each byte times its block's scale, element 2i from the high nibble
        hi = tl.load(CODE + (packed >> 4)) * absmax
        lo = tl.load(CODE + (packed & 0xF)) * absmax
        return tl.interleave(hi, lo)

    @triton.jit
    def _dequantize_nf4_kernel(
        CODES,
        ABSMAX_Q,
        ABSMAX_SCALE,
        ABSMAX_OFFSET,
        CODE,
        ABSMAX_CODE,
        OUT,
        numel,
        n_bytes,
        n_blocks,
        BLOCK_SIZE: tl.constexpr,
        SCALER_BLOCK_SIZE: tl.constexpr,
        BLOCKS: tl.constexpr,
    ):
        # rows are whole blocks: row r holds block r's BLOCK_SIZE / 2 bytes (block_size is even)
        HALF: tl.constexpr = BLOCK_SIZE // 2
        block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
        byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [BLOCKS, HALF]
        # each code byte is read exactly once: let it leave the cache first
        packed = tl.load(CODES + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first").to(tl.int32)
        # one scale per block (not per byte), broadcast over the row below
        absmax = _block_absmax(ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, ABSMAX_CODE, block, block < n_blocks,
                               SCALER_BLOCK_SIZE)  # [BLOCKS]
        vals = _nf4_values(CODE, packed, absmax[:, None])  # [BLOCKS, BLOCK_SIZE]
        out = block[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
        # the weight is written once and read back only after far more than L2 has gone by:
        # a cache-streaming store keeps it from evicting anything useful
        tl.store(OUT + out, vals.to(OUT.dtype.element_ty), mask=out < numel, cache_modifier=".cs")

    @triton.jit
    def _dequantize_nf4_flat_kernel(
        CODES,
        ABSMAX_Q,
        ABSMAX_SCALE,
        ABSMAX_OFFSET,
        CODE,
        ABSMAX_CODE,
        OUT,
        numel,
        n_bytes,
        BLOCK_SIZE: tl.constexpr,
        SCALER_BLOCK_SIZE: tl.constexpr,
        BYTES: tl.constexpr,
    ):
        # one byte per lane, any even block size: every byte gathers its own block's scale
        byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
        in_range = byte < n_bytes
        packed = tl.load(CODES + byte, mask=in_range, other=0).to(tl.int32)
        # both nibbles of a byte share a block: block_size is even
        absmax = _block_absmax(ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, ABSMAX_CODE, (byte * 2) // BLOCK_SIZE,
                               in_range, SCALER_BLOCK_SIZE)
        vals = _nf4_values(CODE, packed, absmax)  # [2 * BYTES]
        out = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(OUT + out, vals.to(OUT.dtype.element_ty), mask=out < numel)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _dequantize_nf4_triton(codes, absmax_q, absmax_scale, absmax_offset, code, absmax_code, *, numel, block_size,
                           scaler_block_size, dtype, out=None, bytes_per_program=_BYTES,
                           num_warps=_WARPS) -> torch.Tensor:
    # bytes_per_program (a power of two) / num_warps are the launch shape; bench/nf4_dequant.py
    # sweeps them. The tiled kernel takes bytes_per_program / (block_size / 2) whole blocks per
    # program, rounded down to a power of two and at least one.
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=codes.device)
    if not numel:
        return out
    n_bytes = codes.numel()
    args = (codes, absmax_q, absmax_scale, absmax_offset.reshape(1), code, absmax_code, out, numel, n_bytes)
    # fp fusion off: an FMA would round the block scale once where the reference rounds twice
    launch = dict(BLOCK_SIZE=block_size, SCALER_BLOCK_SIZE=scaler_block_size, num_warps=num_warps,
                  enable_fp_fusion=False)
    half = block_size // 2
    if _is_power_of_two(half):
        blocks = max(1, bytes_per_program // half)
        blocks = 1 << (blocks.bit_length() - 1)  # tl.arange length: a power of two
        n_blocks = absmax_q.numel()
        _dequantize_nf4_kernel[(triton.cdiv(n_blocks, blocks),)](*args, n_blocks, BLOCKS=blocks, **launch)
    else:  # a block row would not be a power-of-two tile
        _dequantize_nf4_flat_kernel[(triton.cdiv(n_bytes, bytes_per_program),)](
            *args, BYTES=bytes_per_program, **launch)
    return out


def dequantize_nf4(
    codes: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor,
    *,
    numel: int,
    block_size: int = 64,
    scaler_block_size: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize NF4 storage to a flat [numel] tensor of ``dtype`` (no autograd).

    The Triton kernel runs for CUDA tensors when triton imports (see ``tunelab.kernels``'
    backend switch), the PyTorch reference otherwise. Arguments as in
    :func:`dequantize_nf4_reference`; all tensors must be contiguous and on one device.
    ``out`` (contiguous [numel] of ``dtype``), when given, receives the values and is returned:
    the NF4 layers dequantize every weight into one reused buffer.
    """
    args = (codes, absmax_q, absmax_scale, absmax_offset, code, absmax_code)
    kwargs = dict(numel=numel, block_size=block_size, scaler_block_size=scaler_block_size, dtype=dtype)
    if torch.compiler.is_compiling():
        # one opaque node (see _dequantize_nf4_op); a fresh output: the compiled graph plans its
        # own buffers
        result = _dequantize_nf4_op(*args, **kwargs)
        return result if out is None else out.copy_(result)
    if out is not None and (out.shape != (numel,) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [{numel}] {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    if use_triton(codes) and block_size % 2 == 0:
        return _dequantize_nf4_triton(*args, **kwargs, out=out)
    result = dequantize_nf4_reference(*args, **kwargs)
    return result if out is None else out.copy_(result)


@torch.library.custom_op("tunelab::dequantize_nf4", mutates_args=())
def _dequantize_nf4_op(codes: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
                       absmax_offset: torch.Tensor, code: torch.Tensor, absmax_code: torch.Tensor, numel: int,
                       block_size: int, scaler_block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_nf4`` as a custom op for torch.compile: traced QLoRA layers call the kernel
    as one node instead of dynamo tracing into the Triton launch (or the reference's table
    lookups) in every projection of the forward and the backward."""
    return dequantize_nf4(codes, absmax_q, absmax_scale, absmax_offset, code, absmax_code, numel=numel,
                          block_size=block_size, scaler_block_size=scaler_block_size, dtype=dtype)


@_dequantize_nf4_op.register_fake
def _(codes, absmax_q, absmax_scale, absmax_offset, code, absmax_code, numel, block_size, scaler_block_size, dtype):
    return codes.new_empty(numel, dtype=dtype)
