"""Time the LoRA SwiGLU kernels (kernels/lora_mlp.py) at 8B shapes over tile / warp choices.

    python bench/lora_mlp_bench.py            (on the GPU machine; one JSON line per variant)

Each line: the variant's forward and backward kernel times (ms per call, triton do_bench
medians), registers and spills per thread, and the floors they are compared to in the same
process: the plain SwiGLU kernels (same bytes moved minus the small rank-r operands) and the
cuBLAS rank-r [tokens, hidden] GEMMs they replace (3 per MLP: gate, up forward, down backward).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _profiled, device_name, emit  # noqa: E402


def main() -> None:
    import triton
    from triton.testing import do_bench

    import tunelab.kernels.lora_mlp as lm
    from tunelab.kernels.swiglu import _gated_bwd, _gated_fwd

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--in-function", action="store_true", help="only the eager / compiled in-function times")
    opts = ap.parse_args()
    n, f, r = opts.tokens, opts.hidden, opts.rank
    if opts.in_function:
        return in_function(n, f, r)
    dev, dt = "cuda", torch.bfloat16
    g0, u0, dh = (torch.randn(n, f, device=dev, dtype=dt) for _ in range(3))
    xa = torch.randn(n, 2 * r, device=dev, dtype=dt)
    bg, bu = (torch.randn(f, r, device=dev, dtype=dt) * 0.1 for _ in range(2))
    gbd = torch.randn(n, r, device=dev, dtype=dt)
    ad = torch.randn(r, f, device=dev, dtype=dt) * 0.1
    y, dg, du = (torch.empty_like(g0) for _ in range(3))
    base = dict(device=device_name(torch.device(dev)), bench="lora_mlp_bench", shape=f"{n}x{f} r{r} bf16")

    block = 1024
    grid1 = (triton.cdiv(n * f, block),)
    floors = {
        "swiglu_fwd_ms": do_bench(lambda: _gated_fwd[grid1](g0, u0, y, n * f, BLOCK=block, GELU=False, num_warps=4)),
        "swiglu_bwd_ms": do_bench(lambda: _gated_bwd[grid1](dh, g0, u0, dg, du, n * f, BLOCK=block, GELU=False,
                                                           num_warps=4)),
        "rank_r_gemm_ms": do_bench(lambda: torch.mm(xa[:, :r], bg.t())),
    }
    emit(dict(base, variant="floors", **{k: round(v, 4) for k, v in floors.items()}))

    # elements per thread = BM * BN / (32 * warps): the fp32 tiles (g, u, dh) and the 64-bit
    # pointers of each element must fit the registers
    for bm, bn, warps in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8)):
        if not 8 <= bm * bn // (32 * warps) <= 64:
            continue
        meta = dict(BM=bm, BN=bn, num_warps=warps, K=max(16, triton.next_power_of_2(r)), DOT_FP32=False)
        grid = (triton.cdiv(n, bm), triton.cdiv(f, bn))

        def fwd():
            return lm._swiglu_lora_fwd[grid](g0, u0, xa, bg, bu, y, n, f, xa.stride(0), r, r, 2.0, 2.0, **meta)

        def bwd():
            return lm._swiglu_lora_bwd[grid](dh, gbd, ad, g0, u0, xa, bg, bu, dg, du, n, f, xa.stride(0), r, r, r,
                                             2.0, 2.0, **meta)

        try:
            kf, kb = fwd(), bwd()
            row = dict(base, variant=f"BM{bm} BN{bn} w{warps}", fwd_ms=round(do_bench(fwd), 4),
                       bwd_ms=round(do_bench(bwd), 4), fwd_regs=kf.n_regs, fwd_spills=kf.n_spills,
                       bwd_regs=kb.n_regs, bwd_spills=kb.n_spills)
        except Exception as e:  # a variant that does not compile (shared memory, registers)
            row = dict(base, variant=f"BM{bm} BN{bn} w{warps}", error=str(e).splitlines()[0][:200])
        emit(row)


def in_function(n: int, f: int, r: int, dim: int = 4096) -> None:
    """The kernels' times inside LoRASwiGLUFunction (fp32 adapters as in the 8B step), eager and
    compiled, from the profiler: does the graph they run in change them?"""
    from tunelab.kernels import backend
    from tunelab.modules.feed_forward import FeedForward
    from tunelab.modules.peft import apply_lora

    dev = torch.device("cuda")
    mlp = FeedForward(dim, f).to(dev, torch.bfloat16)
    apply_lora(mlp, ["gate_proj", "up_proj", "down_proj"], rank=r, alpha=2 * r, adapter_dtype=torch.float32)
    for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        torch.nn.init.normal_(m.lora_b.weight, std=0.01)
    x = torch.randn(2, n // 2, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for name, fn in (("eager", mlp), ("compiled", torch.compile(mlp))):
        with backend("triton"):
            for _ in range(3):
                fn(x).sum().backward()
            prof, _ = _profiled(lambda fn=fn: fn(x).sum().backward(), steps=5, device=dev)
        times = {e.key: round(e.device_time_total / e.count, 1) for e in prof.key_averages()
                 if "swiglu" in e.key or "triton" in e.key}
        emit(dict(device=device_name(dev), bench="lora_mlp_bench in_function", mode=name, kernel_us=times))


if __name__ == "__main__":
    main()
