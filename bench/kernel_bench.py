"""Micro-benchmark: each tunelab kernel vs its PyTorch reference, eager and torch.compile'd.

Forward + backward on the Llama-3.1-8B workload's shapes (4096 tokens = batch 2 x 2048, dim
4096, 32/8 heads of 128, ffn 14336, vocab 128256, LoRA rank 16), bf16, random inputs. Prints
one JSON line per (kernel, implementation):

    {"commit", "device", "torch", "triton", "kernel", "impl", "shape", "dtype",
     "ms" (CUDA events around each fwd+bwd call, launch overhead included),
     "gbps" (memory-bound kernels: minimum bytes moved / ms) or "tflops" (matmul-bound),
     "gpu_ms", "gpu_gbps"/"gpu_tflops" (the same call replayed as a CUDA graph: GPU time only),
     "peak_extra_mib" (allocated on top of the inputs during one fwd+bwd), "vs_eager" (by ms)}

Usage (CUDA only):  python bench/kernel_bench.py [--commit SHA] [--only rms_norm,rope,...]
    [--no-compile] [--out results.jsonl]
Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunelab.kernels.fused_ce import fused_linear_cross_entropy, linear_cross_entropy_reference
from tunelab.kernels.lora import LoRALinearFunction, lora_linear_reference
from tunelab.kernels.rms_norm import RMSNormFunction, rms_norm_reference
from tunelab.kernels.rope import RoPEFunction, rope_reference
from tunelab.kernels.swiglu import SwiGLUFunction, swiglu_reference

TOKENS, BATCH, SEQ = 4096, 2, 2048
DIM, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, RANK = 4096, 32, 8, 128, 14336, 128256, 16
DT = torch.bfloat16
DEVICE = "cuda"


def _git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()


def _commit() -> str:
    """Short HEAD, with "-dirty" when the tree has uncommitted changes."""
    try:
        return _git("rev-parse", "--short", "HEAD") + ("-dirty" if _git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _randn(*shape, scale=1.0, grad=False):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DT).requires_grad_(grad)


@dataclass
class Case:
    """One kernel on one shape: ``fused(*args)`` vs ``reference(*args)``, backward with ``dy``."""

    shape: list[int]
    args: tuple
    dy: torch.Tensor | None  # None: the output is a scalar loss
    grads: list[torch.Tensor]  # inputs that receive gradients (reset before every call)
    fused: Callable
    reference: Callable
    bytes: int | None = None  # minimum bytes moved fwd+bwd (memory-bound kernels)
    flops: int | None = None  # matmul flops fwd+bwd (matmul-bound kernels)

    def step(self, fn: Callable) -> Callable[[], None]:
        def run() -> None:
            for t in self.grads:
                t.grad = None
            fn(*self.args).backward(self.dy)

        return run


def case_rms_norm() -> Case:
    x = _randn(TOKENS, DIM, grad=True)
    w = (1 + 0.1 * torch.randn(DIM, device=DEVICE)).to(DT)  # frozen, as under LoRA
    return Case(
        shape=[TOKENS, DIM], args=(x, w, 1e-5), dy=_randn(TOKENS, DIM), grads=[x],
        fused=RMSNormFunction.apply, reference=rms_norm_reference,
        bytes=5 * x.numel() * 2,  # fwd: read x, write y; bwd: read x and dy, write dx
    )  # fmt: skip


def case_rope() -> Case:
    # q as Attention passes it: a [b, h, s, d] view of [b, s, h, d] memory.
    q = _randn(BATCH, SEQ, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()
    pos = torch.arange(SEQ, device=DEVICE)[None].expand(BATCH, -1)
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)  # (b, s, hd)
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)
    return Case(
        shape=[BATCH, HEADS, SEQ, HEAD_DIM], args=(q, cos, sin),
        dy=_randn(BATCH, HEADS, SEQ, HEAD_DIM), grads=[q],
        fused=RoPEFunction.apply, reference=rope_reference,
        bytes=4 * q.numel() * 2 + 4 * cos.numel() * 2,  # q read+written each way, cos/sin read
    )  # fmt: skip


def case_swiglu() -> Case:
    gate, up = _randn(TOKENS, FFN, grad=True), _randn(TOKENS, FFN, grad=True)
    return Case(
        shape=[TOKENS, FFN], args=(gate, up), dy=_randn(TOKENS, FFN), grads=[gate, up],
        fused=SwiGLUFunction.apply, reference=swiglu_reference,
        bytes=8 * gate.numel() * 2,  # fwd: 2 reads + 1 write; bwd: 3 reads + 2 writes
    )  # fmt: skip


def case_fused_ce() -> Case:
    hidden = _randn(TOKENS, DIM, grad=True)
    weight = _randn(VOCAB, DIM, scale=DIM**-0.5)  # frozen LM head
    labels = torch.randint(0, VOCAB, (TOKENS,), device=DEVICE)
    labels[torch.rand(TOKENS, device=DEVICE) < 0.1] = -100
    return Case(
        shape=[TOKENS, DIM, VOCAB], args=(hidden, weight, labels), dy=None, grads=[hidden],
        fused=fused_linear_cross_entropy, reference=linear_cross_entropy_reference,
        flops=4 * TOKENS * DIM * VOCAB,  # logits + grad_hidden matmuls
    )  # fmt: skip


def case_lora(out_dim: int) -> Case:
    x = _randn(TOKENS, DIM, grad=True)
    w = _randn(out_dim, DIM, scale=DIM**-0.5)
    a = _randn(RANK, DIM, scale=DIM**-0.5, grad=True)
    b = _randn(out_dim, RANK, scale=0.01, grad=True)
    n, i, o, r = TOKENS, DIM, out_dim, RANK
    return Case(
        shape=[n, i, o, r], args=(x, w, a, b, 2.0), dy=_randn(n, o), grads=[x, a, b],
        fused=LoRALinearFunction.apply, reference=lora_linear_reference,
        flops=4 * n * i * o + 6 * n * r * (i + o),  # base fwd + grad_x, six rank-r products
    )  # fmt: skip


CASES = {
    "rms_norm": case_rms_norm,
    "rope": case_rope,
    "swiglu": case_swiglu,
    "fused_ce": case_fused_ce,
    "lora_q_proj": lambda: case_lora(HEADS * HEAD_DIM),
    "lora_gate_proj": lambda: case_lora(FFN),
}


def _peak_extra_mib(fn, grads) -> float:
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    for t in grads:
        t.grad = None
    return round(extra / 2**20, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default=None)
    p.add_argument("--only", default=None, help="comma-separated kernel names")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_bench.py needs a CUDA GPU")
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    commit = args.commit or _commit()
    meta = dict(commit=commit, device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__)  # fmt: skip
    out = open(args.out, "a") if args.out else None
    for name in args.only.split(",") if args.only else list(CASES):
        torch.manual_seed(0)
        case = CASES[name]()
        impls = {"eager": case.reference, "triton": case.fused}
        if not args.no_compile:
            impls["compile"] = torch.compile(case.reference, dynamic=False)
        eager_ms = None
        for impl, fn in impls.items():
            step = case.step(fn)
            ms = do_bench(step, warmup=25, rep=200, return_mode="median")
            eager_ms = ms if impl == "eager" else eager_ms
            row = dict(meta, kernel=name, impl=impl, shape=case.shape, dtype="bf16", ms=round(ms, 4))
            unit, work = ("gbps", case.bytes / 1e6) if case.bytes else ("tflops", case.flops / 1e9)
            row[unit] = round(work / ms, 1)
            # The same fwd+bwd replayed as a CUDA graph: GPU time without the Python/launch
            # overhead that dominates the small memory-bound kernels when timed one by one
            # (in a training step that overhead overlaps with the GEMMs).
            try:
                gpu_ms = do_bench_cudagraph(step, rep=100, return_mode="median")
                row["gpu_ms"] = round(gpu_ms, 4)
                row["gpu_" + unit] = round(work / gpu_ms, 1)
            except RuntimeError as err:  # e.g. an op that cannot be captured; report, go on
                row["cudagraph_error"] = str(err).splitlines()[0][:200]
            row["peak_extra_mib"] = _peak_extra_mib(step, case.grads)
            row["vs_eager"] = round(eager_ms / ms, 3)  # speed-up over the eager reference
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
        del case
        torch.cuda.empty_cache()
    if out:
        out.close()


if __name__ == "__main__":
    main()
