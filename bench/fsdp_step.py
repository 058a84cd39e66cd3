"""Per-GPU throughput and peak memory of lora_finetune_distributed's training step (FSDP2).

The performance.md workload, sharded: Llama-3.1-8B shape (or 70B shape) with random bf16
weights built on the meta device and sharded by ``fully_shard`` per decoder layer + root (the
recipe's own ``setup``: tunelab.training.distributed), batch 2 x 2048 random tokens PER GPU,
LoRA r16 / alpha 32 on all seven projections (fp32 adapters, bf16 compute, fp32 gradient
reduce), activation checkpointing per layer, AdamW on the adapters, 2 warm-up + 6 timed steps.
tokens_per_s is per GPU (batch * seq * steps / time on each rank); peak_gib is the largest
torch.cuda.max_memory_allocated over the ranks. Rank 0 prints one JSON line (append it to
bench/results/fsdp.jsonl).

    torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py             # 8B, world size 1
    torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py             # 8B on 2 GPUs
    SHAPE=70b torchrun --standalone --nproc_per_node 8 bench/fsdp_step.py   # 70B shape
    SHAPE=70b LAYERS=8 torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py  # 70B layers on 1 GPU
    SHAPE=tiny torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py  # CPU / gloo smoke run

Environment knobs: SHAPE (8b | 70b | tiny), LAYERS (override the layer count), BATCH, SEQ,
STEPS, WARMUP, AC (1/0), RESHARD (reshard_after_forward 1/0), OFFLOAD (CPU offload 1/0),
PROFILE (name recorded in the line), BENCH_OUT (also append the line to this file),
TUNELAB_COMMIT (the commit recorded where the tree has no .git).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tunelab.kernels.fused_ce import loss_sum
from tunelab.models import build_model, llama3_1_8b, llama3_1_70b, tiny
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training import distributed as dist_utils
from tunelab.training.steps import wrap_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import TARGETS, device_name, emit  # noqa: E402


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def model_args(shape: str):
    layers = os.environ.get("LAYERS")
    extra = {"n_layers": int(layers)} if layers else {}
    if shape == "8b":
        return llama3_1_8b(**extra)
    if shape == "70b":
        return llama3_1_70b(**extra)
    if shape == "tiny":
        return tiny(vocab_size=1024, **extra)
    raise SystemExit(f"SHAPE={shape!r}: use 8b, 70b or tiny")


def main() -> None:
    shape = os.environ.get("SHAPE", "8b")
    batch, seq = env_int("BATCH", 2), env_int("SEQ", 2048 if shape != "tiny" else 64)
    steps, warmup = env_int("STEPS", 6 if shape != "tiny" else 2), env_int("WARMUP", 2 if shape != "tiny" else 1)
    ac, reshard, offload = bool(env_int("AC", 1)), bool(env_int("RESHARD", 1)), bool(env_int("OFFLOAD", 0))
    device = dist_utils.init_distributed("auto", timeout_s=600)
    cuda = device.type == "cuda"
    rank, world = dist_utils.rank(), dist_utils.world_size()
    dtype = torch.bfloat16 if cuda else torch.float32

    # the recipe's setup, with random weights instead of a checkpoint
    args = model_args(shape)
    model = build_model(args, device="meta", dtype=dtype)
    apply_lora(model, TARGETS, rank=16, alpha=32, adapter_dtype=torch.float32)
    set_trainable_params(model)
    wrap_layers(model, activation_checkpointing=ac, compile_layers=False)
    dist_utils.shard_model(model, param_dtype=dtype if cuda else None, reshard_after_forward=reshard,
                           cpu_offload=offload and cuda)
    model.to_empty(device="cpu" if offload and cuda else device)
    gen = torch.Generator(device=model.tok_embeddings.weight.to_local().device).manual_seed(rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local()
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            elif ".lora_" not in name:
                local.normal_(0.0, 0.02, generator=gen)
    torch.manual_seed(0)
    dist_utils.init_lora_sharded(model)
    model.rope.reset_parameters(device=device)
    model.train()
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    g = torch.Generator().manual_seed(1000 + rank)  # every rank its own random (non-zero) tokens
    tokens = torch.randint(1, args.vocab_size, (batch, seq), generator=g).to(device)
    labels = torch.randint(1, args.vocab_size, (batch, seq), generator=g).to(device)

    def step() -> float:
        hidden = model(tokens, return_hidden=True)  # (b, s, dim)
        loss = loss_sum(hidden, model.output_weight, labels) / labels.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist_utils.barrier()

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start

    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    layers = f" layers{args.n_layers}" if os.environ.get("LAYERS") else ""
    row = {
        "device": device_name(device),
        "torch": torch.__version__,
        "system": "tunelab",
        "bench": "fsdp_step",
        "world_size": world,
        "profile": os.environ.get("PROFILE") or f"fsdp_lora_{shape}{'_ac' if ac else '_no_ac'}",
        "config": f"{shape}{layers} bs{batch} seq{seq} per gpu, lora r16 all 7 proj, ac={ac}, "
                  f"reshard_after_forward={reshard}, cpu_offload={offload and cuda}, {'bf16' if cuda else 'fp32'} eager",
        "tokens_per_s": round(batch * seq * steps / elapsed, 1),  # per GPU
        "peak_gib": round(peak.item(), 2) if cuda else None,
        "step_ms": round(1000 * elapsed / steps, 1),
        "loss": round(loss, 4),
    }
    if rank == 0:
        emit(row)
    dist_utils.destroy_distributed()


if __name__ == "__main__":
    main()
