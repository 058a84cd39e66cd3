"""Per-GPU throughput and peak memory of lora_finetune_distributed's training step (FSDP2).

The performance.md workload, sharded: Llama-3.1-8B shape (or 70B shape) with random bf16
weights built on the meta device and sharded by ``fully_shard`` per decoder layer + root (the
recipe's own ``shard_model``: tunelab.training.sharding), batch 2 x 2048 random tokens PER
GPU, LoRA r16 / alpha 32 on all seven projections (fp32 adapters, bf16 compute, fp32 gradient
reduce), activation checkpointing per layer, AdamW on the adapters, 2 warm-up + 6 timed steps.
tokens_per_s is per GPU (batch * seq * steps / time on each rank); peak_gib is the largest
torch.cuda.max_memory_allocated over the ranks. Rank 0 prints one JSON line per measured
setting (append them to bench/results/).

One launch can sweep the FSDP switches (comma lists; every combination, each on a freshly
built and sharded model in the same process group): PREFETCH (``fsdp.prefetch_layers``) and
RESHARD (``fsdp.reshard_after_forward`` 1/0). The defaults (PREFETCH=0, RESHARD=1) are the
recipes' default behaviour and keep the profile name ``fsdp_lora_<shape>_ac``; other settings
add ``_pf<k>`` / ``_noreshard`` to the profile, and every line's config string names them.

    torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py             # 8B, world size 1
    torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py             # 8B on 2 GPUs
    PREFETCH=0,1,2 RESHARD=1,0 ROUNDS=2 torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py
    SHAPE=70b torchrun --standalone --nproc_per_node 8 bench/fsdp_step.py   # 70B shape
    SHAPE=70b LAYERS=8 torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py  # 70B layers on 1 GPU
    SHAPE=tiny torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py  # CPU / gloo smoke run

Environment knobs: SHAPE (8b | 70b | tiny), LAYERS (override the layer count), BATCH, SEQ,
STEPS, WARMUP, AC (1/0), COMPILE (1: torch.compile per layer, CUDA), QUANT (nf4: the QLoRA model, NF4 base sharded), RESHARD (list of 1/0), PREFETCH (list of k >= 0),
SHARD_FROZEN (list of 1/0: ``fsdp.shard_frozen``; 0 keeps the frozen base whole on every rank), ROUNDS (repeat the
whole sweep, in the same order, to see the run-to-run spread), OFFLOAD (CPU offload 1/0),
PROFILE (the profile name's base), OVERLAP (1: add the GPU time split of two more steps to the
line: compute, NCCL, NCCL hidden behind compute, NCCL exposed, idle; ms per step), TRACE (a folder: a gzipped chrome trace of one timed step
per setting and rank, for finding the exposed collectives), BENCH_OUT (also append the lines
to this file), TUNELAB_COMMIT (the commit recorded where the tree has no .git). NCCL_*
variables that are set are recorded in the line's ``env``.
"""

from __future__ import annotations

import gc
import gzip
import itertools
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from tunelab.models import llama3_1_8b, llama3_1_70b, tiny
from tunelab.modules.peft import get_adapter_params
from tunelab.training import process_group, sharded_io, sharding
from tunelab.training.steps import wrap_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import TARGETS, comm_overlap, device_name, emit, lora_train_step  # noqa: E402


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_ints(name: str, default: str) -> list[int]:
    """A comma-separated list of integers from the environment (``"0,1,2"``)."""
    return [int(v) for v in os.environ.get(name, default).split(",") if v.strip()]


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


def build_sharded(args, *, device: torch.device, dtype: torch.dtype, ac: bool, reshard: bool, prefetch: int,
                  offload: bool, quantize: str | None, compile_layers: bool = False, shard_frozen: bool = True):
    """The recipe's setup with random weights instead of a checkpoint: meta build (LoRA, or
    QLoRA with ``quantize="nf4"``), checkpointing, ``shard_model`` with the given switches, then
    each rank fills its shard (NF4 storage: random codes and block scales, so the dequantized
    weights are random too; compute and memory equal a real checkpoint's). A frozen base left
    out of FSDP (``shard_frozen=False``) is filled the same on every rank, as a checkpoint would."""
    cuda = device.type == "cuda"
    lora = SimpleNamespace(targets=TARGETS, rank=16, alpha=32, dropout=0.0, use_dora=False)
    model = sharding.build_meta_model(args, dtype, lora, quantize)
    wrap_layers(model, activation_checkpointing=ac, compile_layers=compile_layers)
    sharding.shard_model(model, param_dtype=dtype if cuda else None, reshard_after_forward=reshard,
                           cpu_offload=offload, prefetch_layers=prefetch, shard_frozen=shard_frozen)
    model.to_empty(device="cpu" if offload else device)
    param_device = sharding.local_tensor(model.tok_embeddings.weight).device
    sharded = torch.Generator(device=param_device).manual_seed(process_group.rank())
    replicated = torch.Generator(device=param_device).manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = sharding.local_tensor(p)
            gen = replicated if local is p else sharded
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            elif local.dtype == torch.uint8:  # NF4 codes and quantized block scales
                local.random_(0, 256, generator=gen)
            elif name.endswith(("absmax_scale_bits", "absmax_offset_bits")):
                local.fill_(0.02)  # block absmax = offset + scale * code in [-1, 1]: within [0, 0.04]
            elif ".lora_" not in name:
                local.normal_(0.0, 0.02, generator=gen)
    torch.manual_seed(0)
    sharded_io.init_lora_sharded(model)
    model.reset_rope(device)
    return model.train()


def measure(model, tokens: torch.Tensor, labels: torch.Tensor, *, steps: int, warmup: int,
            trace: Path | None) -> tuple[float, float, dict | None]:
    """Warm-up steps, then ``steps`` timed ones; returns (seconds, last loss, comm overlap or
    None). With ``trace``, one more step runs under the profiler afterwards (so the timing does
    not include it); with $OVERLAP set, two more under ``comm_overlap``."""
    device = tokens.device
    optimizer = torch.optim.AdamW(list(get_adapter_params(model).values()), lr=1e-4)

    step = lora_train_step(model, optimizer, tokens, labels)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        process_group.barrier()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    if os.environ.get("OVERLAP") and device.type == "cuda":  # every rank profiles: the step has collectives
        overlap = comm_overlap(step, steps=2, device=device)
    else:
        overlap = None
    if trace is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            sync()
        trace.parent.mkdir(parents=True, exist_ok=True)
        raw = trace.with_suffix("")  # the .json beside the .json.gz
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f, gzip.open(trace, "wb") as out:
            shutil.copyfileobj(f, out)
        raw.unlink()
    return elapsed, loss, overlap


def main() -> None:
    shape = os.environ.get("SHAPE", "8b")
    batch, seq = env_int("BATCH", 2), env_int("SEQ", 2048 if shape != "tiny" else 64)
    steps, warmup = env_int("STEPS", 6 if shape != "tiny" else 2), env_int("WARMUP", 2 if shape != "tiny" else 1)
    ac, offload_asked = bool(env_int("AC", 1)), bool(env_int("OFFLOAD", 0))
    compile_layers = bool(env_int("COMPILE", 0)) and torch.cuda.is_available()
    reshards, prefetches = [bool(r) for r in env_ints("RESHARD", "1")], env_ints("PREFETCH", "0")
    shard_frozens = [bool(f) for f in env_ints("SHARD_FROZEN", "1")]
    rounds = env_int("ROUNDS", 1)
    quantize = os.environ.get("QUANT") or None
    trace_dir = Path(os.environ["TRACE"]) if os.environ.get("TRACE") else None
    device = process_group.init_distributed("auto", timeout_s=600)
    cuda = device.type == "cuda"
    offload = offload_asked and cuda
    rank, world = process_group.rank(), process_group.world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    args = model_args(shape)
    nccl_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}  # e.g. NCCL_MAX_NCHANNELS

    g = torch.Generator().manual_seed(1000 + rank)  # every rank its own random (non-zero) tokens
    tokens = torch.randint(1, args.vocab_size, (batch, seq), generator=g).to(device)
    labels = torch.randint(1, args.vocab_size, (batch, seq), generator=g).to(device)

    for _ in range(rounds):
        for reshard, prefetch, shard_frozen in itertools.product(reshards, prefetches, shard_frozens):
            model = build_sharded(args, device=device, dtype=dtype, ac=ac, reshard=reshard, prefetch=prefetch,
                                  offload=offload, quantize=quantize, compile_layers=compile_layers,
                                  shard_frozen=shard_frozen)
            # switches off = the name earlier results carry; others get their own profile
            switches = ((f"_pf{prefetch}" if prefetch else "") + ("" if reshard else "_noreshard")
                        + ("" if shard_frozen else "_replicated") + ("_compile" if compile_layers else ""))
            kind = "qlora" if quantize else "lora"
            profile = (os.environ.get("PROFILE") or f"fsdp_{kind}_{shape}{'_ac' if ac else '_no_ac'}") + switches
            trace = trace_dir / f"trace_{profile}_rank{rank}.json.gz" if trace_dir else None
            elapsed, loss, overlap = measure(model, tokens, labels, steps=steps, warmup=warmup, trace=trace)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            layers = f" layers{args.n_layers}" if os.environ.get("LAYERS") else ""
            row = {
                "device": device_name(device),
                "torch": torch.__version__,
                "system": "tunelab",
                "bench": "fsdp_step",
                "world_size": world,
                "profile": profile,
                "config": f"{shape}{layers} bs{batch} seq{seq} per gpu, {kind}{' ' + quantize if quantize else ''} r16 all 7 proj, ac={ac}, "
                          f"reshard_after_forward={reshard}, prefetch_layers={prefetch}, cpu_offload={offload}, "
                          f"{'' if shard_frozen else 'frozen base replicated (shard_frozen=False), '}"
                          f"{'bf16' if cuda else 'fp32'} {'compiled layers' if compile_layers else 'eager'}",
                "tokens_per_s": round(batch * seq * steps / elapsed, 1),  # per GPU
                "peak_gib": round(peak.item(), 2) if cuda else None,
                "step_ms": round(1000 * elapsed / steps, 1),
                "loss": round(loss, 4),
                **({"env": nccl_env} if nccl_env else {}),
                **({"gpu_ms_per_step": overlap} if overlap else {}),
            }
            if rank == 0:
                emit(row)
            # the next setting starts from an empty allocator: FSDP states hold reference cycles
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    process_group.destroy_distributed()


if __name__ == "__main__":
    main()
