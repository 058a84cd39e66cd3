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
         PROFILE (name in the row), OUT (also append the line to this file).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from tunelab.models import build_model, llama3_1_8b, tiny
from tunelab.modules.nf4 import apply_lora_nf4, quantize_linears_
from tunelab.modules.peft import get_adapter_params, set_trainable_params
from tunelab.recipes import lora_finetune_single_device as recipe

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def _fill(module: torch.nn.Module, gen: torch.Generator, prefix: str = "") -> None:
    for name, p in module.named_parameters(prefix=prefix):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def random_qlora_model(shape: str, device: torch.device, dtype: torch.dtype):
    """Built on meta, then materialised piece by piece: embeddings/norm/head dense, each decoder
    layer dense for a moment and then NF4 (peak = NF4 model + one dense layer)."""
    args = llama3_1_8b() if shape == "8b" else tiny(vocab_size=1024)
    model = build_model(args, device="meta", dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, child in model.named_children():
        if name == "layers":
            continue
        child.to_empty(device=device)
        _fill(child, gen, prefix=name)
    for layer in model.layers:
        layer.to_empty(device=device)
        _fill(layer, gen)
        quantize_linears_(layer, skip=())
    model.rope.reset_parameters(device)
    return model


def main() -> None:
    shape = os.environ.get("SHAPE", "8b")
    steps = int(os.environ.get("STEPS", 6))
    warmup = int(os.environ.get("WARMUP", 2))
    batch = int(os.environ.get("BATCH", 2))
    seq = int(os.environ.get("SEQ", 2048 if shape == "8b" else 64))
    ac = os.environ.get("AC", "1") == "1"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = random_qlora_model(shape, device, dtype)
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    apply_lora_nf4(model, TARGETS, rank=16, alpha=32, adapter_dtype=torch.float32)
    set_trainable_params(model)
    if ac:
        for layer in model.layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    model.train()
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    base_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".weight." in n)
    base_params = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight") and hasattr(m.weight, "codes"))

    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    batch_data = {
        "tokens": torch.randint(1, vocab, (batch, seq), generator=gen),  # never zeros
        "labels": torch.randint(1, vocab, (batch, seq), generator=gen),
    }

    def step() -> float:
        n_labels = batch * seq
        loss = recipe.loss_sum(model, batch_data, device) / n_labels
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start

    row = {
        "commit": commit(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "system": "tunelab",
        "profile": os.environ.get("PROFILE") or ("qlora_lean" if ac else "qlora_no_ac"),
        "config": f"{shape} bs{batch} seq{seq} qlora nf4 r16 all-linear ac={ac} eager fused-adamw",
        "tokens_per_s": round(batch * seq * steps / elapsed, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "load_peak_gib": round(load_peak, 2) if load_peak is not None else None,
        "nf4_bytes_per_param": round(base_bytes / max(base_params, 1), 4),
        "step_ms": round(1000 * elapsed / steps, 1),
        "loss": round(loss, 4),
        "date": time.strftime("%Y-%m-%d"),
    }
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.environ["OUT"], "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
