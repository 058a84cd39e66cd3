"""Throughput and peak memory of tunelab's QLoRA training step (the workload of docs/performance.md).

Llama-3.1-8B shape with random bf16 weights quantized to NF4 (no checkpoint can be downloaded
on the GPU box; compute and memory equal the real model's), built layer by layer so the dense
model never exists: each decoder layer is materialised in bf16 on the device, filled with
N(0, 0.02), and its seven projections quantized before the next one is built. Batch 2 x 2048
random tokens, LoRA r16 / alpha 32 on all seven projections with fp32 adapters, fused AdamW on
the adapters, activation checkpointing per decoder layer, the loss of the recipe
(``loss_sum`` of ``recipes/lora_finetune_single_device.py``). WARMUP untimed + STEPS timed
steps; tokens/s = batch x seq x STEPS / time; peak = torch.cuda.max_memory_allocated over the
timed steps (reset after warm-up). Prints one JSON line (append it to bench/results/).

    python bench/qlora_step.py                                # 8B, GPU
    SHAPE=tiny STEPS=2 WARMUP=1 python bench/qlora_step.py    # CPU smoke run (seq 64)
    Env: SHAPE=8b|tiny, STEPS (6), WARMUP (2), BATCH (2), SEQ (2048; tiny: 64), AC=1|0,
         COMPILE=0|1 (torch.compile per layer), GRAPH=0|1 (the step as one CUDA graph), OFFLOAD=0|1 (offload_activations), PROFILE (name in the row), BENCH_OUT (also
         append the line to this file), TRACE (append a per-phase kernel-time breakdown there).
"""

from __future__ import annotations

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
    shape = os.environ.get("SHAPE", "8b")
    steps = int(os.environ.get("STEPS", 6))
    warmup = int(os.environ.get("WARMUP", 2))
    batch = int(os.environ.get("BATCH", 2))
    seq = int(os.environ.get("SEQ", 2048 if shape == "8b" else 64))
    ac = os.environ.get("AC", "1") == "1"
    compile_layers = os.environ.get("COMPILE", "0") == "1"
    offload = os.environ.get("OFFLOAD", "0") == "1"
    graph = os.environ.get("GRAPH", "0") == "1"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = random_model(shape, device, dtype, nf4=True)
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    apply_lora(model, TARGETS, rank=16, alpha=32, adapter_dtype=torch.float32)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=ac, compile_layers=compile_layers, offload_activations=offload)
    model.train()
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda", capturable=graph)
    base_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".weight." in n)
    base_params = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight") and hasattr(m.weight, "codes"))

    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (batch, seq), generator=gen).to(device)  # never zeros
    labels = torch.randint(1, vocab, (batch, seq), generator=gen).to(device)
    step = lora_train_step(model, optimizer, tokens, labels, graph=graph)

    elapsed, loss = time_steps(step, warmup=warmup, steps=steps, device=device, reset_peak=not graph)
    profile = os.environ.get("PROFILE") or ("qlora_lean" if ac else "qlora_no_ac")
    write_breakdown(os.environ.get("TRACE"), step, steps=2, device=device, label=profile)

    emit({
        "device": device_name(device),
        "torch": torch.__version__,
        "system": "tunelab",
        "profile": profile,
        "config": f"{shape} bs{batch} seq{seq} qlora nf4 r16 all-linear ac={ac} offload={offload} "
                  f"{'compile' if compile_layers else 'eager'}{' graph' if graph else ''} fused-adamw",
        "tokens_per_s": round(batch * seq * steps / elapsed, 1),
        "peak_gib": peak_gib(device),
        "reserved_gib": reserved_gib(device),
        "load_peak_gib": round(load_peak, 2) if load_peak is not None else None,
        "nf4_bytes_per_param": round(base_bytes / max(base_params, 1), 4),
        "step_ms": round(1000 * elapsed / steps, 1),
        "loss": round(loss, 4),
    })


if __name__ == "__main__":
    main()
