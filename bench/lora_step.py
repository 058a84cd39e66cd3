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
import json
import subprocess
import time
from pathlib import Path

import torch

from tunelab.kernels import loss_sum
from tunelab.models import build_model, llama3_1_8b, tiny
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training.steps import wrap_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """The model built on meta, then materialised on ``device`` with random N(0, 0.02) weights."""
    args = llama3_1_8b() if shape == "8b" else tiny(vocab_size=1024)
    model = build_model(args, device="meta", dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.rope.reset_parameters(device)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["8b", "tiny"], default="8b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-ac", dest="ac", action="store_false", help="no activation checkpointing")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (as the 8B configs)")
    ap.add_argument("--adapter-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="dtype of the LoRA A/B weights (the recipe keeps them fp32)")
    ap.add_argument("--profile", default=None, help="name recorded in the JSON line")
    ap.add_argument("--out", default=None, help="also append the JSON line to this file")
    opts = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(opts.shape, device, dtype)
    adapter_dtype = torch.float32 if opts.adapter_dtype == "fp32" else torch.bfloat16
    apply_lora(model, TARGETS, rank=16, alpha=32, adapter_dtype=adapter_dtype)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=opts.ac, compile_layers=opts.compile)
    model.train()
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (opts.batch, opts.seq), generator=gen).to(device)
    labels = torch.randint(0, vocab, (opts.batch, opts.seq), generator=gen).to(device)

    def step() -> float:
        # the recipe's loss: fused chunked linear + cross-entropy on CUDA, summed, / label count
        hidden = model(tokens, return_hidden=True)  # (b, s, dim)
        loss = loss_sum(hidden, model.output_weight, labels) / labels.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(opts.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(opts.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start

    tokens_per_s = opts.batch * opts.seq * opts.steps / elapsed
    row = {
        "commit": commit(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "system": "tunelab",
        "profile": opts.profile or ("lora_lean" if opts.ac else "lora_fast"),
        "config": f"{opts.shape} bs{opts.batch} seq{opts.seq} lora r16 all-linear ac={opts.ac} "
                  f"compile={opts.compile} fused-ce adapters={opts.adapter_dtype}",
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "step_ms": round(1000 * elapsed / opts.steps, 1),
        "loss": round(loss, 4),
        "date": time.strftime("%Y-%m-%d"),
    }
    line = json.dumps(row)
    print(line, flush=True)
    if opts.out:
        with open(opts.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
