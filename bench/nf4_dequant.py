"""NF4 dequantization throughput (tunelab's Triton kernel) against the device copy bandwidth.

Bytes moved by a dequantization: read the packed codes (n/2), the 8-bit scales (n/64) and the
fp32 scales, write n bf16 values (2n). Bandwidth = bytes / time. The ceiling is a plain
device-to-device copy of a 1 GiB buffer (read + write bytes / time), timed the same way; the
issue's target is >= 80% of it.

- Headline (``gb_per_s``, ``fraction_of_copy``): one large NF4 weight ([32768, 16384], 1 GiB of
  bf16 output) dequantized with the shipped kernel, timed like the copy, so launch cost is
  negligible for both: the kernel's bandwidth against the copy's.
- ``shapes_graph_gb_per_s``: the Llama-3.1-8B weight shapes ([4096, 4096], [1024, 4096],
  [14336, 4096], [4096, 14336]) replayed from a CUDA graph (kernel time only; a graph's memcpy
  nodes run on the copy engines at ~2.75 TB/s on an H200, so ``graph_sweep``'s own copy figure
  is not the device's copy ceiling), and ``graph_sweep`` over launch shapes.
- ``per_shape`` / ``per_call_gb_per_s``: ``NF4Weight.dequantize(bf16)`` called from Python per
  shape, launch included (a few tens of microseconds of host time per call bound the small
  shapes; in a training step the launches run ahead of the GPU).
Also times the PyTorch reference (the CPU path) and, if installed, bitsandbytes'
dequantize_4bit of the same bytes, for context. Prints one JSON line (append it to
bench/results/).

    python bench/nf4_dequant.py                      # GPU
    SHAPE=tiny ITERS=2 python bench/nf4_dequant.py   # CPU smoke run (small matrices)
    Env: SHAPE=8b|tiny, ITERS (50), PROFILE (name in the row), BENCH_OUT (also append the line here).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from tunelab.kernels import backend
from tunelab.kernels.nf4 import _BYTES as SHIPPED, _WARPS as SHIPPED_WARPS
from tunelab.modules.nf4 import to_nf4

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import device_name, emit, peak_gib  # noqa: E402

SHAPES_8B = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
             "down_proj": (4096, 14336)}
SHAPES_TINY = {"square": (256, 256), "wide": (128, 640)}




def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call (median of 3 rounds of ``iters`` calls after a warm-up call)."""
    fn()
    rounds = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / iters)
    return sorted(rounds)[1]


def graph_seconds(fn, iters: int = 20) -> float:
    """Device seconds per call of ``fn`` replayed from a CUDA graph (no Python launch cost)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # warm-up / compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return sorted(times)[2]


def launch_sweep(shapes: dict, device: torch.device) -> dict:
    # the shipped launch shape is one of the sweep's (kernels/nf4.py: _BYTES, _WARPS)
    """Kernel-only bandwidth (CUDA-graph replay) of the 8B shapes for several launch shapes
    (packed bytes per program, warps): the copy ceiling is a kernel-only number too."""
    from tunelab.kernels.nf4 import _dequantize_nf4_triton

    weights = {name: to_nf4(torch.randn(r, c, device=device, dtype=torch.bfloat16) * 0.02)
               for name, (r, c) in shapes.items()}
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / graph_seconds(lambda: dst.copy_(src), 5) / 1e9
    del src, dst
    result = {"copy_gb_per_s": round(copy, 1)}
    for per_program, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]:
        moved = seconds = 0.0
        for w4 in weights.values():
            code, absmax_code = w4.levels()
            n = w4.numel()

            def call(w4=w4, code=code, absmax_code=absmax_code, n=n):
                _dequantize_nf4_triton(w4.codes, w4.absmax_q, w4.absmax_scale, w4.absmax_offset, code,
                                       absmax_code, numel=n, block_size=w4.block_size,
                                       scaler_block_size=w4.scaler_block_size, dtype=torch.bfloat16,
                                       bytes_per_program=per_program, num_warps=warps)

            seconds += graph_seconds(call)
            moved += n // 2 + n // 64 + 4 * w4.absmax_scale.numel() + 2 * n
        gbs = moved / seconds / 1e9
        result[f"bytes{per_program}_warps{warps}"] = {"gb_per_s": round(gbs, 1), "fraction_of_copy": round(gbs / copy, 3)}
    return result


def main() -> None:
    shape_set = os.environ.get("SHAPE", "8b")
    iters = int(os.environ.get("ITERS", 50))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES_8B if shape_set == "8b" else SHAPES_TINY

    copy_bytes = 2**30 if device.type == "cuda" else 2**24
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * copy_bytes / timed(lambda: dst.copy_(src), max(iters // 5, 2), device) / 1e9
    del src, dst

    per_shape = {}
    total_bytes = total_time = ref_time = 0.0
    bnb_time = None
    try:  # context only: the bench runs without bitsandbytes
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None
    if bnb is not None:
        bnb_time = 0.0
    for name, (rows, cols) in shapes.items():
        w4 = to_nf4(torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02)
        n = rows * cols
        moved = n // 2 + n // 64 + 4 * w4.absmax_scale.numel() + 2 * n
        t = timed(lambda: w4.dequantize(torch.bfloat16), iters, device)
        with backend("reference"):
            t_ref = timed(lambda: w4.dequantize(torch.bfloat16), max(iters // 10, 1), device)
        per_shape[name] = {"shape": [rows, cols], "us": round(t * 1e6, 1), "gb_per_s": round(moved / t / 1e9, 1)}
        total_bytes += moved
        total_time += t
        ref_time += t_ref
        if bnb is not None and bnb_time is not None:
            try:
                packed, state = bnb.quantize_4bit(torch.randn(rows, cols, device=device, dtype=torch.bfloat16),
                                                  blocksize=64, quant_type="nf4", compress_statistics=True)
                bnb_time += timed(lambda: bnb.dequantize_4bit(packed, state), iters, device)
            except Exception as e:  # e.g. a bitsandbytes build without this GPU's kernels
                print(f"notice: bitsandbytes timing skipped ({type(e).__name__}: {e})", flush=True)
                bnb_time = None

    per_call = total_bytes / total_time / 1e9
    big_rows, big_cols = (32768, 16384) if device.type == "cuda" else (512, 256)
    w4 = to_nf4(torch.randn(big_rows, big_cols, device=device, dtype=torch.bfloat16) * 0.02)
    n = big_rows * big_cols
    out = torch.empty(n, dtype=torch.bfloat16, device=device)
    big_time = timed(lambda: w4.dequantize(torch.bfloat16, out=out), max(iters // 5, 2), device)
    gbs = (n // 2 + n // 64 + 4 * w4.absmax_scale.numel() + 2 * n) / big_time / 1e9
    del w4, out
    sweep = launch_sweep(shapes, device) if device.type == "cuda" else None
    emit({
        "device": device_name(device),
        "torch": torch.__version__,
        "system": "tunelab",
        "profile": os.environ.get("PROFILE") or "nf4_dequant",
        "config": f"{shape_set} llama3.1-8b linear shapes, bf16 out, kernel={'triton' if device.type == 'cuda' else 'reference'}",
        "tokens_per_s": None,  # not a training workload
        "peak_gib": peak_gib(device),
        "gb_per_s": round(gbs, 1),
        "copy_gb_per_s": round(copy_gbs, 1),
        "fraction_of_copy": round(gbs / copy_gbs, 3),
        "large_shape": [big_rows, big_cols],
        "shapes_graph_gb_per_s": (sweep or {}).get(f"bytes{SHIPPED}_warps{SHIPPED_WARPS}", {}).get("gb_per_s"),
        "per_call_gb_per_s": round(per_call, 1),
        "reference_gb_per_s": round(total_bytes / ref_time / 1e9, 1),
        "bitsandbytes_gb_per_s": round(total_bytes / bnb_time / 1e9, 1) if bnb_time else None,
        "per_shape": per_shape,
        "graph_sweep": sweep,
    })


if __name__ == "__main__":
    main()
