"""Throughput and peak memory of tunelab's LoRA training step (the performance.md workload).

Llama-3.1-8B shape with random bf16 weights (no checkpoint can be downloaded on the GPU box;
compute and memory equal the real model's), batch 2 x 2048 random tokens, LoRA r16 / alpha 32 on
all seven projections with fp32 adapters, fused AdamW on the adapters, activation checkpointing
per decoder layer (optionally torch.compile per layer, as the 8B configs), the recipe's fused
chunked linear + cross-entropy, 2 warm-up + 6 timed steps; tokens/s = batch * seq * steps / time,
peak = torch.cuda.max_memory_allocated. Prints one JSON line (append it to bench/results/).

    python bench/lora_step.py                      # 8B, the default "lean" profile
    python bench/lora_step.py --no-ac --profile fast
    python bench/lora_step.py --shape tiny --steps 2 --warmup 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training.steps import wrap_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import (TARGETS, device_name, emit, lora_train_step, peak_gib, random_model, reserved_gib, time_steps,  # noqa: E402
                     write_breakdown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["8b", "tiny"], default="8b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-ac", dest="ac", action="store_false", help="no activation checkpointing")
    ap.add_argument("--ac-every", type=int, default=1, help="checkpoint every k-th layer only (selective)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (as the 8B configs)")
    ap.add_argument("--offload", action="store_true", help="offload_activations: checkpointed layer inputs in pinned CPU memory")
    ap.add_argument("--graph", action="store_true", default=os.environ.get("GRAPH") == "1", help="replay the whole step as one CUDA graph (GraphedStep)")
    ap.add_argument("--adapter-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="dtype of the LoRA A/B weights (the recipe keeps them fp32)")
    ap.add_argument("--profile", default=None, help="name recorded in the JSON line")
    ap.add_argument("--out", default=None, help="also append the JSON line to this file")
    ap.add_argument("--trace", default=os.environ.get("TRACE"), help="append a per-phase GPU kernel-time breakdown here")
    opts = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(opts.shape, device, dtype)
    adapter_dtype = torch.float32 if opts.adapter_dtype == "fp32" else torch.bfloat16
    apply_lora(model, TARGETS, rank=16, alpha=32, adapter_dtype=adapter_dtype)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=opts.ac and opts.ac_every, compile_layers=opts.compile,
                offload_activations=opts.offload)
    model.train()
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda", capturable=opts.graph)

    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (opts.batch, opts.seq), generator=gen).to(device)
    labels = torch.randint(0, vocab, (opts.batch, opts.seq), generator=gen).to(device)

    step = lora_train_step(model, optimizer, tokens, labels, graph=opts.graph)

    elapsed, loss = time_steps(step, warmup=opts.warmup, steps=opts.steps, device=device, reset_peak=not opts.graph)

    tokens_per_s = opts.batch * opts.seq * opts.steps / elapsed
    profile = (opts.profile or ("lora_lean" if opts.ac else "lora_fast")) + ("_graph" if opts.graph else "")
    write_breakdown(opts.trace, step, steps=2, device=device, label=profile)
    emit({
        "device": device_name(device),
        "torch": torch.__version__,
        "system": "tunelab",
        "profile": profile,
        "config": f"{opts.shape} bs{opts.batch} seq{opts.seq} lora r16 all-linear "
                  f"ac={opts.ac if opts.ac_every == 1 or not opts.ac else f'every{opts.ac_every}'} "
                  f"compile={opts.compile} offload={opts.offload} graph={opts.graph} fused-ce adapters={opts.adapter_dtype}",
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_gib": peak_gib(device),
        "reserved_gib": reserved_gib(device),
        "step_ms": round(1000 * elapsed / opts.steps, 1),
        "loss": round(loss, 4),
    }, opts.out)


if __name__ == "__main__":
    main()
