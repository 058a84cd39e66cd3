"""Throughput and peak memory of tunelab's DPO training step (issue 7's workload).

The peer is ``../shared/bench/dpo_anchor.py`` (TRL DPOTrainer + PEFT): the same workload here.
Llama-3.1-8B shape with random bf16 weights (no checkpoint can be downloaded on the GPU box;
compute and memory equal the real model's), 2 pairs per step, prompt 512 + response 512 random
tokens on each side (4 rows x 1024 = 4,096 tokens per step, one forward for chosen + rejected),
LoRA r16 / alpha 32 on all seven projections with fp32 adapters, reference = the same model
with adapters disabled under no_grad (the recipe's default in-step reference), sigmoid loss
beta 0.1, AdamW on the adapters, activation checkpointing per decoder layer. The step is the
recipe's own code (``pair_losses`` of ``recipes/lora_dpo_single_device.py``). WARMUP untimed +
STEPS timed steps; tokens/s = 4,096 x STEPS / time; peak = torch.cuda.max_memory_allocated over
the timed steps. Prints one JSON line (append it to bench/results/).

    python bench/dpo_step.py                               # 8B, GPU
    SHAPE=tiny STEPS=2 WARMUP=1 python bench/dpo_step.py   # CPU smoke run (prompt 16 + 16)
    Env: SHAPE=8b|tiny, STEPS (8), WARMUP (2), AC=1|0, COMPILE=0|1, PROFILE (name in the row),
         OUT (also append the line to this file).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.checkpoint import checkpoint

from tunelab.models import build_model, llama3_1_8b, tiny
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.recipes import lora_dpo_single_device as recipe

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS = 2


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


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """Built on meta, materialised on ``device`` with N(0, 0.02) weights (norms at 1)."""
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


def random_pairs(vocab: int, prompt_len: int, response_len: int, gen: torch.Generator) -> dict:
    """A collated batch [2 * PAIRS, prompt + response]: chosen rows, then rejected rows, sharing
    their prompts; labels pre-shifted, the prompt masked (as preference_collate makes them)."""
    prompts = torch.randint(0, vocab, (PAIRS, prompt_len), generator=gen)
    responses = torch.randint(0, vocab, (2 * PAIRS, response_len), generator=gen)
    tokens = torch.cat([prompts.repeat(2, 1), responses], dim=1)  # (2 * PAIRS, s)
    labels = torch.full_like(tokens, -100)
    labels[:, prompt_len - 1 : -1] = tokens[:, prompt_len:]  # targets of the response tokens
    return {"tokens": tokens, "labels": labels}


def main() -> None:
    shape = os.environ.get("SHAPE", "8b")
    steps, warmup = int(os.environ.get("STEPS", 8)), int(os.environ.get("WARMUP", 2))
    ac, use_compile = os.environ.get("AC", "1") == "1", os.environ.get("COMPILE", "0") == "1"
    prompt_len, response_len = (512, 512) if shape == "8b" else (16, 16)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(shape, device, dtype)
    apply_lora(model, TARGETS, rank=16, alpha=32, adapter_dtype=torch.float32)
    set_trainable_params(model)
    for layer in model.layers:  # as the LoRA recipe's setup_model does
        forward = torch.compile(layer.forward) if use_compile and device.type == "cuda" else layer.forward
        layer.forward = functools.partial(checkpoint, forward, use_reentrant=False) if ac else forward
    model.train()
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=5e-5, fused=device.type == "cuda")
    cfg = SimpleNamespace(loss=recipe.LossConfig(type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.0))
    gen = torch.Generator().manual_seed(0)
    batches = [random_pairs(model.args.vocab_size, prompt_len, response_len, gen) for _ in range(steps + warmup)]

    def step(batch: dict) -> float:
        losses, _, _ = recipe.pair_losses(model, batch, cfg, device)
        loss = losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for batch in batches[:warmup]:
        step(batch)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        loss = step(batch)
    sync()
    elapsed = time.perf_counter() - start

    tokens_per_step = 2 * PAIRS * (prompt_len + response_len)
    row = {
        "commit": commit(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "system": "tunelab",
        "profile": os.environ.get("PROFILE") or f"dpo_{'lean' if ac else 'no_ac'}{'_compile' if use_compile else ''}",
        "config": f"{shape} dpo sigmoid {PAIRS} pairs prompt{prompt_len}+resp{response_len} lora r16 all-linear "
                  f"ref=adapters-off ac={ac} compile={use_compile}",
        "tokens_per_s": round(tokens_per_step * steps / elapsed, 1),
        "pairs_per_s": round(PAIRS * steps / elapsed, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
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
