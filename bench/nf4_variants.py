"""Experiment: NF4 dequantization kernel variants against the copy ceiling (kernel-only,
CUDA-graph replay, Llama-3.1-8B linear shapes).

Variants (each checked bit-for-bit against the PyTorch reference before timing):
  flat      kernels/nf4.py's earlier kernel, now its fallback for block sizes that are not powers
            of two (_dequantize_nf4_flat_kernel): one byte per lane, per-byte scale gathers.
  tile      [blocks, 32] byte tile: one scale load per 64-weight block, broadcast over the row.
  tile_cs   tile + streaming (evict-first) loads and cache-streaming stores; with 64 blocks and
            4 warps, the kernel kernels/nf4.py ships (_dequantize_nf4_kernel).
  per_out   [blocks, 64] output tile: each output loads its own byte (duplicated loads hit L1)
            so the store is a plain contiguous vector.

    python bench/nf4_variants.py          # GPU; prints one JSON line
    SHAPE=tiny python bench/nf4_variants.py   # CPU smoke (TRITON_INTERPRET=1), correctness only
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from tunelab.kernels.nf4 import _dequantize_nf4_flat_kernel, dequantize_nf4_reference
from tunelab.modules.nf4 import to_nf4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, emit  # noqa: E402
from nf4_dequant import SHAPES_8B, SHAPES_TINY, graph_seconds  # noqa: E402


@triton.jit
def _tile_kernel(CODES, ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, CODE, ABSMAX_CODE, OUT, numel, n_bytes, n_blocks,
                 BLOCK_SIZE: tl.constexpr, SCALER_BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                 STREAM: tl.constexpr):
    HALF: tl.constexpr = BLOCK_SIZE // 2
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [BLOCKS, HALF]
    if STREAM:
        packed = tl.load(CODES + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first").to(tl.int32)
    else:
        packed = tl.load(CODES + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    bm = blk < n_blocks
    q = tl.load(ABSMAX_Q + blk, mask=bm, other=0).to(tl.int32)
    scale = tl.load(ABSMAX_SCALE + blk // SCALER_BLOCK_SIZE, mask=bm, other=0.0)
    absmax = tl.load(ABSMAX_CODE + q) * scale + tl.load(ABSMAX_OFFSET)  # [BLOCKS]
    hi = tl.load(CODE + (packed >> 4)) * absmax[:, None]
    lo = tl.load(CODE + (packed & 0xF)) * absmax[:, None]
    vals = tl.interleave(hi, lo)  # [BLOCKS, BLOCK_SIZE]
    out = blk[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    if STREAM:
        tl.store(OUT + out, vals.to(OUT.dtype.element_ty), mask=out < numel, cache_modifier=".cs")
    else:
        tl.store(OUT + out, vals.to(OUT.dtype.element_ty), mask=out < numel)


@triton.jit
def _per_out_kernel(CODES, ABSMAX_Q, ABSMAX_SCALE, ABSMAX_OFFSET, CODE, ABSMAX_CODE, OUT, numel, n_bytes, n_blocks,
                    BLOCK_SIZE: tl.constexpr, SCALER_BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr,
                    STREAM: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    j = tl.arange(0, BLOCK_SIZE)
    out = blk[:, None] * BLOCK_SIZE + j[None, :]  # [BLOCKS, BLOCK_SIZE]
    packed = tl.load(CODES + out // 2, mask=out < numel, other=0).to(tl.int32)
    nibble = (packed >> (4 - 4 * (j[None, :] % 2))) & 0xF  # even element: high nibble
    bm = blk < n_blocks
    q = tl.load(ABSMAX_Q + blk, mask=bm, other=0).to(tl.int32)
    scale = tl.load(ABSMAX_SCALE + blk // SCALER_BLOCK_SIZE, mask=bm, other=0.0)
    absmax = tl.load(ABSMAX_CODE + q) * scale + tl.load(ABSMAX_OFFSET)
    vals = tl.load(CODE + nibble) * absmax[:, None]
    if STREAM:
        tl.store(OUT + out, vals.to(OUT.dtype.element_ty), mask=out < numel, cache_modifier=".cs")
    else:
        tl.store(OUT + out, vals.to(OUT.dtype.element_ty), mask=out < numel)


def run_variant(kernel, w4, code, absmax_code, *, blocks, warps, stream):
    n = w4.numel()
    out = torch.empty(n, dtype=torch.bfloat16, device=w4.codes.device)
    n_blocks = w4.absmax_q.numel()
    kernel[(triton.cdiv(n_blocks, blocks),)](
        w4.codes, w4.absmax_q, w4.absmax_scale, w4.absmax_offset.reshape(1), code, absmax_code, out, n,
        w4.codes.numel(), n_blocks, BLOCK_SIZE=w4.block_size, SCALER_BLOCK_SIZE=w4.scaler_block_size,
        BLOCKS=blocks, STREAM=stream, num_warps=warps)
    return out


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES_8B if os.environ.get("SHAPE", "8b") == "8b" else {**SHAPES_TINY, "odd": (33, 100)}
    weights = {name: to_nf4(torch.randn(r, c, device=device, dtype=torch.bfloat16) * 0.02)
               for name, (r, c) in shapes.items()}
    variants = {"flat_b1024_w4": None}
    for blocks in (32, 64, 128):
        for warps in (4, 8):
            variants[f"tile_k{blocks}_w{warps}"] = (_tile_kernel, blocks, warps, False)
            variants[f"tile_cs_k{blocks}_w{warps}"] = (_tile_kernel, blocks, warps, True)
            variants[f"per_out_k{blocks}_w{warps}"] = (_per_out_kernel, blocks, warps, False)
    if device.type == "cpu":  # correctness only
        variants = {k: v for k, v in variants.items() if v is None or (v[1] == 32 and v[2] == 4)}

    result = {}
    if device.type == "cuda":
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        result["copy_gb_per_s"] = round(2 * src.numel() / graph_seconds(lambda: dst.copy_(src), 5) / 1e9, 1)
        del src, dst
    for name, spec in variants.items():
        moved = seconds = 0.0
        for w4 in weights.values():
            code, absmax_code = w4.levels()
            n = w4.numel()
            args = (w4.codes, w4.absmax_q, w4.absmax_scale, w4.absmax_offset, code, absmax_code)
            kw = dict(numel=n, block_size=w4.block_size, scaler_block_size=w4.scaler_block_size, dtype=torch.bfloat16)
            if spec is None:
                def call(w4=w4, code=code, absmax_code=absmax_code, n=n):
                    out = torch.empty(n, dtype=torch.bfloat16, device=w4.codes.device)
                    n_bytes = w4.codes.numel()
                    _dequantize_nf4_flat_kernel[(triton.cdiv(n_bytes, 1024),)](
                        w4.codes, w4.absmax_q, w4.absmax_scale, w4.absmax_offset.reshape(1), code, absmax_code,
                        out, n, n_bytes, BLOCK_SIZE=w4.block_size, SCALER_BLOCK_SIZE=w4.scaler_block_size,
                        BYTES=1024, num_warps=4)
                    return out
            else:
                kernel, blocks, warps, stream = spec

                def call(w4=w4, code=code, absmax_code=absmax_code, kernel=kernel, blocks=blocks, warps=warps,
                         stream=stream):
                    return run_variant(kernel, w4, code, absmax_code, blocks=blocks, warps=warps, stream=stream)
            ref = dequantize_nf4_reference(*args, **kw)
            got = call()
            # the kernel may fuse absmax's multiply-add: one fp32 rounding, then the bf16 cast
            torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-6, msg=f"{name}")
            if device.type == "cuda":
                seconds += graph_seconds(call)
            moved += n // 2 + n // 64 + 4 * w4.absmax_scale.numel() + 2 * n
        if device.type == "cuda":
            gbs = moved / seconds / 1e9
            result[name] = {"gb_per_s": round(gbs, 1), "fraction_of_copy": round(gbs / result["copy_gb_per_s"], 3)}
        else:
            result[name] = "ok"
    emit({"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
          "system": "tunelab", "profile": "nf4_dequant_variants",
          "config": "llama3.1-8b linear shapes, bf16 out, kernel-only (CUDA graph)", "tokens_per_s": None,
          "peak_gib": None, "variants": result})


if __name__ == "__main__":
    main()
