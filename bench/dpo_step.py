"""Throughput and peak memory of tunelab's DPO training step (issue 7's workload).

The peer is ``../shared/bench/dpo_anchor.py`` (TRL DPOTrainer + PEFT): the same workload here.
Llama-3.1-8B shape with random bf16 weights (no checkpoint can be downloaded on the GPU box;
compute and memory equal the real model's), 2 pairs per step, prompt 512 + response 512 random
tokens on each side (4 rows x 1024 = 4,096 tokens per step, one forward for chosen + rejected),
LoRA r16 / alpha 32 on all seven projections with fp32 adapters, reference = the same model
with adapters disabled under no_grad (the recipe's default in-step reference), sigmoid loss
beta 0.1, AdamW on the adapters, activation checkpointing per decoder layer. The step is the
recipes' own code (``pair_losses`` of ``tunelab/training/dpo.py``). WARMUP untimed +
STEPS timed steps; tokens/s = 4,096 x STEPS / time; peak = torch.cuda.max_memory_allocated over
the timed steps. Prints one JSON line (append it to bench/results/).

    python bench/dpo_step.py                               # 8B, GPU
    SHAPE=tiny STEPS=2 WARMUP=1 python bench/dpo_step.py   # CPU smoke run (prompt 16 + 16)
    Env: SHAPE=8b|tiny, STEPS (8), WARMUP (2), AC=1|0, COMPILE=0|1, PROFILE (name in the row),
         BENCH_OUT (also append the line to this file), TRACE (append a per-phase kernel-time
         breakdown there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training import dpo
from tunelab.training.steps import wrap_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import TARGETS, device_name, emit, peak_gib, random_model, time_steps, write_breakdown  # noqa: E402

PAIRS = 2





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
    wrap_layers(model, activation_checkpointing=ac, compile_layers=use_compile and device.type == "cuda")
    model.train()
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=5e-5, fused=device.type == "cuda")
    cfg = SimpleNamespace(loss=dpo.LossConfig(type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.0))
    gen = torch.Generator().manual_seed(0)
    batches = [random_pairs(model.args.vocab_size, prompt_len, response_len, gen) for _ in range(steps + warmup)]

    def step(batch: dict) -> float:
        losses = dpo.pair_losses(model, batch, cfg, device).losses
        loss = losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    pending = iter(batches)
    elapsed, loss = time_steps(lambda: step(next(pending)), warmup=warmup, steps=steps, device=device)

    profile = os.environ.get("PROFILE") or f"dpo_{'lean' if ac else 'no_ac'}{'_compile' if use_compile else ''}"
    write_breakdown(os.environ.get("TRACE"), lambda: step(batches[0]), steps=2, device=device, label=profile)
    tokens_per_step = 2 * PAIRS * (prompt_len + response_len)
    emit({
        "device": device_name(device),
        "torch": torch.__version__,
        "system": "tunelab",
        "profile": profile,
        "config": f"{shape} dpo sigmoid {PAIRS} pairs prompt{prompt_len}+resp{response_len} lora r16 all-linear "
                  f"ref=adapters-off ac={ac} compile={use_compile}",
        "tokens_per_s": round(tokens_per_step * steps / elapsed, 1),
        "pairs_per_s": round(PAIRS * steps / elapsed, 3),
        "peak_gib": peak_gib(device),
        "step_ms": round(1000 * elapsed / steps, 1),
        "loss": round(loss, 4),
    })


if __name__ == "__main__":
    main()
