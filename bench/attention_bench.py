"""Attention forward + backward: SDPA backends on causal rows, flex vs dense mask on packed rows.

The Llama-3.1-8B attention shape of the performance.md workload: batch 2 x 2048 tokens, 32 query
heads / 8 kv heads of 128, bf16, random q/k/v (never zeros). Variants, each timed through the
very functions the model calls (``tunelab.modules.attention``):

    causal/<backend>   causal_attention under TUNELAB_SDPA_BACKEND=<backend> (auto = torch's
                       choice with expanded k/v; cudnn/flash take the 8 kv heads natively)
    packed/flex        packed rows of --doc-len token documents: the compiled flex kernel on the
                       BlockMask the decoder builds once per forward (mask_ms: that build)
    packed/dense_sdpa  the same rows through SDPA with the dense [b, 1, s, s] bool mask (the
                       pre-flex path; mask_ms: building that mask)

One JSON line per variant: {"commit", "system", "profile": "attention", "variant", "device",
"torch", "config", "ms" (median fwd+bwd, CUDA events), "tflops" (causal: useful FLOPs, 3.5 x the
forward's 2 * b * h * s^2 * d / 2 * 2), "ran" (the SDPA aten ops seen by the profiler: proves the
backend really ran), "peak_extra_mib", "mask_ms" (packed), "date"}.

    python bench/attention_bench.py                     # GPU, all variants
    python bench/attention_bench.py --only causal/cudnn,packed/flex
    python bench/attention_bench.py --smoke             # CPU smoke: tiny shapes, fp32 (flex forward only)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from tunelab.modules import attention as A

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import device_name, emit  # noqa: E402

VARIANTS = ["causal/auto", "causal/cudnn", "causal/flash", "causal/efficient", "packed/flex", "packed/dense_sdpa"]


def _timer(device: torch.device):
    """A function (fn, warmup, reps) -> median milliseconds of one call."""

    def run(fn, warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def _sdpa_ops(fn, device: torch.device) -> list[str]:
    """The scaled-dot-product aten ops (and flex GPU kernels) one call runs: which backend ran."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    keys = {e.key[:120] for e in prof.key_averages()}
    return sorted(k for k in keys if "_scaled_dot_product_" in k or "flex" in k.lower())


def _peak_extra_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU: proves the script runs")
    ap.add_argument("--only", default=None, help=f"comma-separated variants of {', '.join(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--doc-len", type=int, default=256, help="packed rows: documents of this many tokens")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq, args.heads, args.kv_heads, args.head_dim, args.doc_len = 256, 4, 2, 16, 32
        args.warmup, args.reps = 1, 2
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        sys.exit("bench/attention_bench.py needs a CUDA GPU (or --smoke for the CPU smoke run)")
    variants = args.only.split(",") if args.only else VARIANTS
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {VARIANTS}")

    b, s, h, kvh, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=device, generator=gen).to(dtype).requires_grad_(grad)

    q, k, v = rand(b, h, s, d), rand(b, kvh, s, d), rand(b, kvh, s, d)
    dy = rand(b, h, s, d, grad=False)
    doc = (torch.arange(s, device=device) // args.doc_len)[None].expand(b, s).contiguous()  # (b, s)
    config = dict(batch=b, seq=s, heads=h, kv_heads=kvh, head_dim=d, dtype=str(dtype).removeprefix("torch."))
    timer = _timer(device)
    # CPU flex has no backward in torch: the smoke run times its forward only.
    flex_fwd_only = device.type == "cpu"

    for variant in variants:
        kind, name = variant.split("/")
        row = dict(system="tunelab", profile="attention", variant=variant, device=device_name(device),
                   torch=torch.__version__, config=dict(config))
        passes = "fwd+bwd"
        if kind == "causal":
            policy = A.parse_sdpa_backend(name)

            def call(policy=policy):
                A.causal_attention(q, k, v, policy=policy).backward(dy)

        else:
            row["config"]["doc_len"] = args.doc_len
            build = (lambda: A.document_block_mask(doc)) if name == "flex" else (lambda: A.dense_document_mask(doc))
            row["mask_ms"] = round(timer(build, args.warmup, args.reps), 4)
            mask = build()
            if name == "flex" and flex_fwd_only:
                passes = "fwd"

                def call(mask=mask):  # torch refuses CPU flex on tensors that require grad
                    A.flex_document_attention(q.detach(), k.detach(), v.detach(), mask)

            elif name == "flex":

                def call(mask=mask):
                    A.flex_document_attention(q, k, v, mask).backward(dy)

            else:

                def call(mask=mask):
                    ke, ve = A._expand_kv(k, v, h // kvh)  # as Attention.forward does on this path
                    torch.nn.functional.scaled_dot_product_attention(q, ke, ve, attn_mask=mask).backward(dy)

        def step(call=call):
            q.grad = k.grad = v.grad = None
            call()

        try:
            row["ms"] = round(timer(step, args.warmup, args.reps), 4)
        except RuntimeError as err:  # e.g. a backend that rejects the shape here: report, go on
            row["error"] = str(err).splitlines()[0][:300]
            emit(row, args.out)
            continue
        row["passes"] = passes
        if kind == "causal":
            flops = 3.5 * 2 * 2 * b * h * s * s * d / 2  # fwd: 2 matmuls, causal half; bwd 2.5x
            row["tflops"] = round(flops / (row["ms"] * 1e-3) / 1e12, 3)
        row["ran"] = _sdpa_ops(step, device)
        row["peak_extra_mib"] = _peak_extra_mib(step, device)
        emit(row, args.out)


if __name__ == "__main__":
    main()
