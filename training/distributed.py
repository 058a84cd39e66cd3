"""Distributed training helpers (FSDP2, launched by torchrun): process group, sharded model,
shard-by-shard loading, LoRA init, gathering full state for saving, the rank split of the data.

The model is built on the meta device (no memory), LoRA is applied there, every decoder layer
and then the root are wrapped by ``fully_shard`` (each parameter split along dim 0 over the
ranks), and only then is memory allocated: each rank allocates its own shard. Base weights are
read from the HF safetensors files file by file with ``safe_open(...).get_slice``, so a rank
reads exactly the rows it owns and never holds a whole tensor, let alone the whole model.
LoRA A/B are initialised afterwards from the seeded CPU generator, with the same values
``apply_lora`` gives on one device, and each rank keeps its rows.

QLoRA: the decoder projections are ``NF4Linear`` layers whose packed 4-bit storage (codes,
8-bit block scales, fp32 scale bits) is registered as frozen integer *parameters*, so FSDP
shards it along dim 0 and all-gathers the packed bytes (integer parameters are never cast by
the mixed-precision policy); a layer's forward/backward dequantizes the gathered storage. NF4's
scales are statistics of the whole tensor, so while loading every rank quantizes each full
projection (one tensor in memory at a time) and keeps its rows of the packed result.

Saving gathers full tensors (collective: every rank calls, rank 0 keeps CPU copies) into a CPU
"export model" on rank 0 that the ordinary single-device writers of
``tunelab.training.checkpointing`` save, so the folder layout is the same as single device.

The last section holds what both FSDP recipes (``lora_finetune_distributed``,
``lora_dpo_distributed``) do around their own training step, once: rank 0's output-folder
decision, model setup, resume into shards, the rank-0 gathered save with its barrier, the
global grad norm, rank-0 printing and the "rank N failed" line.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from tunelab.errors import CheckpointError, ConfigError, DataError
from tunelab.models.checkpoint import (
    _IGNORED_HF,
    _open,
    hf_to_native_key,
    native_to_hf_key,
    read_hf_config,
    safetensors_files,
)
from tunelab.models.hf_config import args_from_hf_config
from tunelab.training import recipe_setup
from tunelab.training.checkpointing import COMPLETE, CheckpointManager, ResumableSampler, TrainingProgress, load_state
from tunelab.training.config import instantiate, save_config
from tunelab.training.steps import wrap_layers
from tunelab.training.utils import cuda_only_settings_notice

__all__ = [
    "FSDPConfig",
    "RankSampler",
    "all_gather_stack",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_rank0",
    "build_dataset",
    "build_meta_model",
    "check_distributed_settings",
    "clip_grad_norm",
    "cuda_only_settings",
    "destroy_distributed",
    "exit_finished_run",
    "eval_sampler",
    "full_tensor_on_rank0",
    "gather_full_state",
    "gathered_optimizer_state",
    "init_distributed",
    "init_lora_sharded",
    "is_rank0",
    "load_full_into_sharded",
    "load_hf_weights_sharded",
    "load_sharded_state",
    "name_failing_rank",
    "run_rank",
    "prepare_output_dir",
    "rank",
    "rank0_metrics",
    "read_model_args",
    "restore_progress",
    "save_checkpoint",
    "say",
    "say_model_size",
    "setup_sharded_model",
    "shard_like",
    "shard_model",
    "world_size",
]


# ------------------------------------------------------------------------ process group
def init_distributed(device_name: str, timeout_s: float, recipe: str = "lora_finetune_distributed") -> torch.device:
    """Join the process group torchrun set up (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) and return this rank's device.

    NCCL on CUDA (each rank takes ``cuda:LOCAL_RANK``), gloo on CPU. A collective that waits
    longer than ``timeout_s`` raises instead of hanging (e.g. when another rank died).

    Args:
        device_name: ``auto`` | ``cpu`` | ``cuda`` (``cuda:N`` is refused: torchrun picks it).
        timeout_s: process-group timeout in seconds.
        recipe: the recipe's name, for the launch hint when torchrun did not start it.

    Raises:
        ConfigError: not started by torchrun, or a device that cannot be used.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"{recipe} must be launched by torchrun; use "
                          f"`tune run --nproc_per_node N {recipe} --config ...`")
    if device_name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {device_name!r} is not supported here; use auto, cpu or cuda "
                          "(torchrun gives each rank cuda:LOCAL_RANK)")
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device: cuda but CUDA is not available here; use device=cpu or device=auto")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    return device


def destroy_distributed() -> None:
    """Free what still holds the process group, then destroy it (call once, at the end).

    FSDP modules and DTensors keep the group alive through reference cycles; left to the
    interpreter's shutdown, the group's C++ worker threads are torn down after Python is gone,
    which gloo can answer with an abort. Collecting them first ends them in order.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def exit_finished_run() -> NoReturn:
    """End a finished torchrun worker without the interpreter's shutdown (call last, on success).

    By then every file is written and closed and the process group destroyed. What remains is
    CPython finalizing C++ objects (gloo's transport threads, CUDA state), where c10d has been
    seen to abort a worker ("terminate called without an active exception") after a fully
    successful run, and torchrun then fails the whole job. ``os._exit`` skips that step, after
    flushing stdout and stderr.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective, fp64 so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape and dtype on all ranks) stacked on every rank:
    [world, *t.shape] (``t[None]`` without a process group)."""
    if not dist.is_initialized():
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


# ------------------------------------------------------------------------ data split
class RankSampler(ResumableSampler):
    """``ResumableSampler`` split over ranks like ``DistributedSampler``: rank ``r`` of ``w``
    takes positions ``r, r + w, r + 2w, ...`` of the epoch's order (after ``start``).

    With ``batch_size`` b per rank, micro-batch k of every rank together holds exactly the
    samples ``order[start + k*b*w : start + (k+1)*b*w]``, i.e. the k-th micro-batch of one
    device running batch_size b*w: losses match single device for the same global batch and
    the data position (global micro-batches consumed) is independent of the world size.

    Args:
        num_samples: dataset length.
        seed: base seed of the per-epoch permutations (as ResumableSampler).
        rank, world_size: this rank and the number of ranks.
        shuffle: False keeps the dataset order.
    """

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int, shuffle: bool = True):
        super().__init__(num_samples, seed, shuffle=shuffle)
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :][self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples - self.start, self.world_size))


# ------------------------------------------------------------------------ meta model
NF4_STORAGE = ("codes", "absmax_q", "absmax_scale_bits", "absmax_offset_bits")


def _meta_nf4(shape: tuple[int, int], dtype: torch.dtype, block_size: int = 64, scaler_block_size: int = 256):
    from tunelab.modules.nf4 import NF4Weight

    n = shape[0] * shape[1]
    n_blocks = -(-n // block_size)
    meta = dict(device="meta")
    return NF4Weight(torch.empty((n + 1) // 2, dtype=torch.uint8, **meta),
                     torch.empty(n_blocks, dtype=torch.uint8, **meta),
                     torch.empty(-(-n_blocks // scaler_block_size), dtype=torch.float32, **meta),
                     torch.empty(1, dtype=torch.float32, **meta), shape, dtype, block_size, scaler_block_size)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_nf4_sharding_supported() -> None:
    """FSDP2 before torch 2.13 re-wraps every sharded tensor in a Parameter that requires grad,
    which an integer tensor (NF4's packed storage) cannot: say so up front instead of failing
    deep inside ``fully_shard`` (seen with torch 2.11 on the H200 machine).

    Raises:
        ConfigError: torch older than 2.13 (NF4 storage to shard).
    """
    if _torch_version() < (2, 13):
        raise ConfigError(f"quantize: nf4 with the FSDP recipes needs torch >= 2.13 (this is {torch.__version__}, "
                          "whose FSDP2 cannot shard the integer NF4 storage); upgrade torch, or set "
                          "fsdp.shard_frozen: false (every GPU then holds the whole NF4 base: ~37 GB for 70B)")


def build_meta_model(args, dtype: torch.dtype, lora_cfg, quantize: str | None) -> nn.Module:
    """The LoRA (or QLoRA) model on the meta device, adapters fp32, only adapters trainable.

    With ``quantize="nf4"`` every decoder-block projection becomes an ``NF4Linear`` whose
    storage is held as frozen integer parameters (what FSDP shards), then ``apply_lora`` puts the
    adapters on (NF4LoRALinear there), in the same order as one device does.
    """
    from tunelab.models import build_model
    from tunelab.modules.peft import apply_lora, set_trainable_params

    model = build_model(args, device="meta", dtype=dtype)
    if quantize == "nf4":
        from tunelab.modules.nf4 import NF4Linear, NF4Weight

        for layer in model.layers:
            for name, m in list(layer.named_modules()):
                if type(m) is nn.Linear:
                    parent, _, leaf = name.rpartition(".")
                    setattr(layer.get_submodule(parent), leaf, NF4Linear(_meta_nf4(tuple(m.weight.shape), dtype)))
        for w in [m for m in model.modules() if isinstance(m, NF4Weight)]:
            for name in NF4_STORAGE:
                w.register_parameter(name, nn.Parameter(w._buffers.pop(name), requires_grad=False))
    elif quantize is not None:
        raise ConfigError(f"quantize: {quantize!r} is not supported; use nf4 (QLoRA) or null")
    apply_lora(model, lora_cfg.targets, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, adapter_dtype=torch.float32)
    set_trainable_params(model)
    return model


# ------------------------------------------------------------------------ sharding
@dataclass(kw_only=True)
class FSDPConfig:
    """The ``fsdp:`` section of the distributed recipes' configs (the arguments of :func:`shard_model`)."""

    reshard_after_forward: bool  # true: gather each layer again in backward (least memory)
    cpu_offload: bool  # sharded params/grads/optimizer state in host memory (CUDA only)
    # 0: FSDP2's own overlap; k: each layer's forward/backward issues the all-gathers of the
    # next/previous k layers (hides more of them; k - 1 more gathered layers in memory)
    prefetch_layers: int
    # false: every rank holds the whole frozen base (no all-gathers of it: only the adapters are
    # sharded and their gradients reduced); the fastest choice when the base fits on one GPU
    shard_frozen: bool = True


def shard_model(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    cpu_offload: bool,
    prefetch_layers: int = 0,
    shard_frozen: bool = True,
) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, head).

    Args:
        model: a ``TransformerDecoder`` (normally still on meta).
        param_dtype: compute/all-gather dtype (bf16 mixed precision); gradients are reduced in
            fp32. None keeps the stored dtypes (fp32 CPU runs).
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3;
            gathered again in backward) instead of keeping them until backward (ZeRO-2-like).
        cpu_offload: keep the sharded parameters, gradients and optimizer state on the CPU.
        prefetch_layers: 0 leaves the overlap to FSDP2 (a layer's all-gather is issued when
            its own forward starts, on a side stream; backward gathers the layer before the
            current one, found from the recorded forward order). k >= 1 prefetches explicitly:
            the root's and each layer's forward issue the all-gathers of the next k layers right
            after their own (before their compute is queued), and each backward those of the k
            layers before it. Up to k gathered layers wait ahead of the one computing (k - 1
            layers of gathered weights more than FSDP2's own overlap; 1 is its overlap issued
            earlier). With ``reshard_after_forward=False`` backward gathers nothing, so only the
            forward part acts. The arithmetic is unchanged: only when all-gathers are issued moves.
        shard_frozen: False leaves the frozen parameters (the LoRA base, NF4 storage included)
            out of FSDP (``ignored_params``): every rank keeps a whole plain copy, so nothing but
            the adapters is ever all-gathered (per GPU the base's memory, ~15 GiB for 8B bf16,
            instead of its 1 / world_size share).

    Gradients are averaged over ranks (FSDP's default); a recipe that normalises the loss by
    the label tokens of the whole global batch multiplies it by the world size. Only
    parameters that received a gradient are reduce-scattered, so with LoRA the frozen base
    weights are gathered but never reduced (FSDP2 skips parameters whose ``.grad`` is None).

    Raises:
        ConfigError: ``prefetch_layers`` < 0; ``shard_frozen=False`` with ``cpu_offload`` or on
            torch < 2.7; NF4 storage to shard on torch < 2.13.
    """
    _check_prefetch_layers(prefetch_layers)
    if not shard_frozen and cpu_offload:
        raise ConfigError("fsdp.shard_frozen: false keeps the whole frozen base on every GPU, which fsdp.cpu_offload: "
                          "true cannot offload; set one of them the other way")
    if not shard_frozen and _torch_version() < (2, 7):
        raise ConfigError(f"fsdp.shard_frozen: false needs torch >= 2.7 (FSDP2's ignored_params; this is "
                          f"{torch.__version__}); upgrade torch or set fsdp.shard_frozen: true")
    # (the keyword only when used: FSDP2 before torch 2.7 does not take it)
    ignored = {} if shard_frozen else {"ignored_params": {p for p in model.parameters() if not p.requires_grad}}
    if shard_frozen and any(not p.is_floating_point() for p in model.parameters()):
        check_nf4_sharding_supported()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward,
                    **ignored)
    # The root keeps its weights gathered from forward to backward (FSDP's default for the root):
    # the loss multiplies the hidden states by model.output_weight after the forward returns.
    fully_shard(model, mp_policy=mp, offload_policy=offload, reshard_after_forward=False, **ignored)
    if prefetch_layers:
        _set_layer_prefetch(model, prefetch_layers)
    return model


def _set_layer_prefetch(model: nn.Module, k: int) -> None:
    """Explicit all-gather prefetching over the fixed layer order (see ``shard_model``).

    Safe because every training forward runs all layers in order and every backward runs
    them in reverse: a prefetched layer always computes (and reshards) later in the same
    pass; one that never ran would stay gathered, and an optimizer step would then leave it
    stale. Activation checkpointing lives inside each layer's forward (``wrap_layers``),
    outside FSDP's module hooks, so the recompute in backward fires no forward hook and
    cannot start a second forward-prefetch chain (the pitfall of checkpoint wrappers placed
    around an FSDP module, or of reentrant checkpointing).
    """
    layers = list(model.layers)
    # the root computes only the embedding before layer 0: its prefetch starts the chain
    model.set_modules_to_forward_prefetch(layers[:k])
    # backward starts at the root (the head's gradient), then the last layer, going down
    model.set_modules_to_backward_prefetch(layers[::-1][:k])
    for i, layer in enumerate(layers):
        layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + k])
        # nearest first: FSDP2 issues them in list order and layer i - 1 is needed first.
        # Layer 0 gets an empty list, i.e. FSDP2's default: nothing but the root (still
        # gathered) comes before it, so nothing is issued.
        layer.set_modules_to_backward_prefetch(layers[max(i - k, 0) : i][::-1])


def _check_prefetch_layers(prefetch_layers: int) -> None:
    if isinstance(prefetch_layers, bool) or not isinstance(prefetch_layers, int) or prefetch_layers < 0:
        raise ConfigError(f"fsdp.prefetch_layers must be an integer >= 0 (0 = FSDP2's own overlap, k = "
                          f"all-gather the next k layers ahead), got {prefetch_layers!r}")


def _row_range(full_rows: int, local_rows: int) -> tuple[int, int]:
    """Rows of dim 0 this rank owns under ``Shard(0)`` (torch.chunk: ceil-sized chunks)."""
    chunk = math.ceil(full_rows / world_size()) if full_rows else 0
    start = min(rank() * chunk, full_rows)
    return start, start + local_rows


@torch.no_grad()
def _copy_rows(param: torch.Tensor, read_rows) -> None:
    """Fill ``param`` (a sharded DTensor or a plain tensor) from ``read_rows(start, stop)``."""
    if isinstance(param, DTensor):
        local = param.to_local()
        start, stop = _row_range(param.shape[0], local.shape[0])
        if local.numel():
            local.copy_(read_rows(start, stop))
    else:
        param.copy_(read_rows(0, param.shape[0]))


@torch.no_grad()
def load_hf_weights_sharded(model: nn.Module, checkpoint_dir: str | Path) -> None:
    """Fill the (sharded, materialised) base weights of ``model`` from an HF checkpoint.

    Files are opened one at a time (memory-mapped); for each tensor a rank reads only its rows
    (``get_slice``), casts them and copies them into its shard. Every base weight must be found
    once with the shape config.json implies.

    Raises:
        CheckpointError: missing/unexpected tensors or shapes that do not match.
    """
    from tunelab.modules.nf4 import NF4Weight, to_nf4

    params = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Weight)}  # named like the dense weight
    for name, w in nf4.items():
        params[name] = w  # found by its dense name; its storage parameters are filled together
        for part in NF4_STORAGE:
            params.pop(f"{name}.{part}")
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    by_file: dict[Path, list[str]] = {}
    for hf_name, file in safetensors_files(checkpoint_dir).items():
        by_file.setdefault(file, []).append(hf_name)
    loaded: set[str] = set()
    for file, names in by_file.items():
        with _open(file) as f:
            for hf_name in names:
                if _IGNORED_HF.match(hf_name) or (tied and hf_name == "lm_head.weight"):
                    continue
                try:
                    name = hf_to_native_key(hf_name)
                except KeyError:
                    raise CheckpointError(f"{checkpoint_dir}: unexpected tensor {hf_name!r}; not a plain "
                                          "LlamaForCausalLM checkpoint") from None
                if name not in params:
                    raise CheckpointError(f"{checkpoint_dir}: unexpected tensor {hf_name!r}; the weights do "
                                          "not match config.json")
                p = params[name]
                piece = f.get_slice(hf_name)
                if tuple(piece.get_shape()) != tuple(p.shape):
                    raise CheckpointError(f"{checkpoint_dir}: tensor {hf_name!r} has shape {list(piece.get_shape())}, "
                                          f"config.json expects {list(p.shape)}; the weights do not match config.json")
                if name in nf4:  # the whole tensor: NF4's scales depend on all of it
                    q = to_nf4(piece[:].to(device=p.codes.device, dtype=p.dtype))
                    for part in NF4_STORAGE:
                        _copy_rows(getattr(p, part), lambda a, b, full=getattr(q, part): full[a:b])
                    del q
                else:
                    _copy_rows(p, lambda a, b: piece[a:b].to(dtype=p.dtype))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: missing tensors {', '.join(native_to_hf_key(k) for k in missing[:3])}; "
                              "the weights do not match config.json")


@torch.no_grad()
def init_lora_sharded(model: nn.Module) -> None:
    """Initialise every LoRA A/B (already sharded and materialised) with the values
    ``apply_lora`` would give on one device from the current global RNG state.

    A throw-away CPU ``LoRALinear`` per adapted layer (its base weight a zero-stride view, so
    it costs no memory) draws the numbers exactly as the single-device path does; each rank
    keeps its rows. Call it at the same point of the seeded RNG stream on every rank.
    """
    from tunelab.modules.peft import LoRALinear, lora_modules

    for _, m in lora_modules(model):
        ghost_base = torch.zeros((), dtype=m.lora_a.weight.dtype).expand(m.out_dim, m.in_dim)
        ghost = LoRALinear(m.in_dim, m.out_dim, m.rank, m.alpha, weight=ghost_base,
                           adapter_dtype=m.lora_a.weight.dtype)
        for mine, full in ((m.lora_a.weight, ghost.lora_a.weight), (m.lora_b.weight, ghost.lora_b.weight)):
            _copy_rows(mine, lambda a, b: full[a:b])


@torch.no_grad()
def load_full_into_sharded(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (CPU) tensor into a sharded parameter / state tensor: each rank its rows."""
    _copy_rows(target, lambda a, b: full[a:b].to(dtype=target.dtype))


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full tensor distributed with the same mesh/placements as ``like`` (local slicing, no
    communication: every rank holds ``full``)."""
    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.to_local().device), like.device_mesh, like.placements, src_data_rank=None)


# ------------------------------------------------------------------------ gathering
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: its shard of a DTensor, a plain (replicated) tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor_on_rank0(t: torch.Tensor) -> torch.Tensor | None:
    """All ranks call; rank 0 gets the full tensor on the CPU, the others None."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().cpu() if is_rank0() else None


def gather_full_state(model: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The model's full parameters by native name on rank 0 (CPU), None elsewhere.

    Gathered one tensor at a time; with ``trainable_only=False`` rank 0 ends up holding the
    whole model in host memory (what a merged HF export needs).
    """
    # A no-grad forward (evaluation, DPO's reference) leaves the modules that keep their weights
    # gathered after forward (the root; every layer with reshard_after_forward: false) holding
    # the unsharded compute copies (bf16 under mixed precision): back to the fp32 shards first.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        full = full_tensor_on_rank0(p)
        if full is not None:
            out[name] = full
    return out if is_rank0() else None


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """``optimizer.state_dict()`` with every sharded state tensor gathered, on rank 0 (same
    format as one device: state by parameter index), None elsewhere."""
    sd = optimizer.state_dict()
    state: dict[int, dict] = {}
    for idx in sorted(sd["state"]):
        state[idx] = {}
        for key, value in sd["state"][idx].items():
            if isinstance(value, torch.Tensor):
                value = full_tensor_on_rank0(value)
            state[idx][key] = value
    return {"state": state, "param_groups": sd["param_groups"]} if is_rank0() else None


# ------------------------------------------------------------------------ recipe pieces
# What every FSDP recipe does around its own training step, written once: the distributed
# counterparts of tunelab.training.recipe_setup (output folder, model, data, resume, save).
def say(*args) -> None:
    """``print`` on rank 0 only (torchrun interleaves every rank's output)."""
    if is_rank0():
        print(*args, flush=True)


@contextmanager
def name_failing_rank() -> Iterator[None]:
    """Re-raise whatever the body raises after printing ``error: rank N failed: Type: message``
    to stderr: torchrun interleaves the ranks' output, so the line says which rank it was."""
    try:
        yield
    except BaseException as e:
        if world_size() > 1:
            print(f"error: rank {rank()} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


def run_rank(train: Callable[[Any, torch.device], None], cfg, recipe: str) -> None:
    """This rank's part of a distributed recipe: join the process group (``cfg.device``,
    ``cfg.dist_timeout_s``), run ``train(cfg, device)`` with a failure naming its rank, and
    leave the group in order whatever happened (before interpreter exit, where gloo can abort).
    """
    device = init_distributed(cfg.device, cfg.dist_timeout_s, recipe=recipe)
    try:
        with name_failing_rank():
            train(cfg, device)
    finally:
        destroy_distributed()


def check_distributed_settings(cfg) -> None:
    """Value ranges of the keys only the FSDP recipes have (``dist_timeout_s``,
    ``fsdp.prefetch_layers``), checked before any process group is joined.

    Raises:
        ConfigError: one line naming the key.
    """
    if cfg.dist_timeout_s < 1:
        raise ConfigError(f"dist_timeout_s must be >= 1, got {cfg.dist_timeout_s}")
    _check_prefetch_layers(cfg.fsdp.prefetch_layers)


def prepare_output_dir(cfg) -> tuple[CheckpointManager, Path | None]:
    """``recipe_setup.prepare_output_dir`` decided by rank 0 (which also writes ``config.yaml``
    as given, before ``builtin:`` names are resolved); every rank gets the same answer.

    Args:
        cfg: the recipe config (output_dir, keep_last_n_checkpoints, resume).

    Returns:
        The checkpoint manager and the step folder to resume from (None = start fresh).

    Raises:
        ConfigError: output_dir unusable, or a rank cannot see the folder rank 0 resumes from.
    """
    resume_name = None
    if is_rank0():
        manager, resume_dir = recipe_setup.prepare_output_dir(cfg)
        save_config(cfg, manager.output_dir / "config.yaml")
        resume_name = resume_dir.name if resume_dir is not None else None
    resume_name = broadcast_from_rank0(resume_name)  # rank 0 decides; the others follow
    manager = CheckpointManager(Path(cfg.output_dir).expanduser(), cfg.keep_last_n_checkpoints)
    resume_dir = manager.output_dir / resume_name if resume_name is not None else None
    if resume_dir is not None and not (resume_dir / COMPLETE).is_file():
        raise ConfigError(f"rank {rank()} cannot see {resume_dir}, which rank 0 resumes from; put output_dir "
                          "on a filesystem every node shares")
    return manager, resume_dir


def cuda_only_settings(device: torch.device, **settings: bool) -> dict[str, bool]:
    """``cuda_only_settings_notice`` with its notice printed by rank 0 only."""
    if is_rank0():
        return cuda_only_settings_notice(device, **settings)
    return {name: bool(on) and device.type == "cuda" for name, on in settings.items()}


def read_model_args(cfg, tokenizer):
    """The model's ``ModelArgs`` from ``checkpoint_dir``/config.json (no weights are read).

    Raises:
        ConfigError: a pre-quantized checkpoint, or a tokenizer with more ids than the model.
    """
    hf_config = read_hf_config(cfg.checkpoint_dir)
    if "quantization_config" in hf_config:
        raise ConfigError(f"{cfg.checkpoint_dir} is pre-quantized, which the FSDP recipes do not load; "
                          "use the dense checkpoint (with quantize=nf4 for QLoRA)")
    args = args_from_hf_config(hf_config)
    recipe_setup.check_vocab(tokenizer, args.vocab_size)
    return args


def setup_sharded_model(cfg, args, device: torch.device, dtype: torch.dtype, compile_layers: bool,
                        offload_activations: bool = False) -> nn.Module:
    """Meta build (NF4 decoder projections with quantize=nf4) -> LoRA -> fully_shard per layer
    and root -> allocate the shards -> base weights read shard by shard -> LoRA initialised as
    on one device (call at the same point of the seeded RNG stream on every rank).

    Args:
        cfg: the recipe config (lora, quantize, activation_checkpointing, fsdp, checkpoint_dir).
        args: ``ModelArgs`` (:func:`read_model_args`).
        device: this rank's device.
        dtype: base weight dtype (bf16 also turns on bf16 mixed precision).
        compile_layers: compile each decoder layer.
        offload_activations: keep the checkpointed layer inputs and attention in pinned CPU
            memory (``wrap_layers``).
    """
    model = build_meta_model(args, dtype, cfg.lora, cfg.quantize)
    wrap_layers(model, activation_checkpointing=cfg.activation_checkpointing, compile_layers=compile_layers,
                offload_activations=offload_activations)
    shard_model(model, param_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None,
                reshard_after_forward=cfg.fsdp.reshard_after_forward, cpu_offload=cfg.fsdp.cpu_offload,
                prefetch_layers=cfg.fsdp.prefetch_layers, shard_frozen=cfg.fsdp.shard_frozen)
    model.to_empty(device="cpu" if cfg.fsdp.cpu_offload else device)
    load_hf_weights_sharded(model, cfg.checkpoint_dir)
    init_lora_sharded(model)
    model.rope.reset_parameters(device=device)
    return model.train()


def say_model_size(model: nn.Module, cfg, device: torch.device) -> None:
    """Rank 0 prints the parameter counts and how much of the parameter storage it holds."""
    n_params, trainable = recipe_setup.count_parameters(model)
    say(f"model: {n_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable (LoRA rank {cfg.lora.rank}), "
        f"FSDP over {world_size()} rank(s) on {device.type} in {cfg.dtype}")
    mib = [sum(t.numel() * t.element_size() for t in ts) / 2**20
           for ts in ([local_tensor(p) for p in model.parameters()], list(model.parameters()))]
    held = "sharded storage" if cfg.fsdp.shard_frozen else "the frozen base whole on every rank"
    say(f"parameters held by rank 0: {mib[0]:.2f} MiB of {mib[1]:.2f} MiB ({held})")


def build_dataset(node: dict, tokenizer, max_seq_len: int, what: str):
    """Every rank builds the dataset (the same rows everywhere); rank 0 reports its size and
    skipped rows (``recipe_setup.build_dataset``)."""
    if is_rank0():
        return recipe_setup.build_dataset(node, tokenizer, max_seq_len, what)
    return instantiate(node, tokenizer=tokenizer, max_seq_len=max_seq_len)


def eval_sampler(num_samples: int) -> RankSampler:
    """Validation rows in order, split over the ranks. Only the largest multiple of the world
    size is used (up to world - 1 rows left out) so every rank runs equally many batches, as
    FSDP's collectives need.

    Raises:
        DataError: fewer validation rows than ranks (nothing would be evaluated).
    """
    world = world_size()
    if num_samples < world:
        raise DataError(f"validation has {num_samples} rows, fewer than the {world} ranks that share it; "
                        "use a larger validation set or validation=null")
    return RankSampler(num_samples // world * world, 0, rank(), world, shuffle=False)


def load_sharded_state(state_dir: Path, model: nn.Module, optimizer, scheduler) -> TrainingProgress:
    """``load_state`` into CPU stand-ins of the adapter and optimizer (full tensors), then
    each rank copies its rows into the sharded parameters and optimizer state. A state folder
    of any world size (or of a single-device run) loads."""
    from tunelab.modules.peft import get_adapter_params

    params = get_adapter_params(model)
    full = {n: torch.empty(p.shape, dtype=p.dtype, requires_grad=True) for n, p in params.items()}
    captured: dict = {}
    stand_in_model = types.SimpleNamespace(named_parameters=lambda: iter(full.items()))
    stand_in_opt = types.SimpleNamespace(param_groups=optimizer.param_groups, load_state_dict=captured.update)
    progress = load_state(state_dir, model=stand_in_model, optimizer=stand_in_opt, scheduler=scheduler)
    for name, p in params.items():
        load_full_into_sharded(p, full[name])
    ordered = list(params.values())  # optimizer index i <-> i-th adapter parameter, as on one device
    state = {i: {k: (shard_like(v, ordered[i]) if torch.is_tensor(v) and k != "step" else v)
                 for k, v in per_param.items()} for i, per_param in captured["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": captured["param_groups"]})
    return progress


def restore_progress(cfg, resume_dir: Path | None, global_batch: int, *, model, optimizer, scheduler,
                     sampler) -> TrainingProgress:
    """A fresh ``TrainingProgress``, or the one in ``resume_dir`` with the adapters, optimizer,
    scheduler, RNG and sampler seed restored (``recipe_setup.restore_progress`` for FSDP).

    The data position counts GLOBAL micro-batches (``batch_size`` x world size), so a
    checkpoint resumes on any world size that keeps that product.

    Raises:
        ConfigError: the checkpoint was written with another global micro-batch.
    """
    if resume_dir is None:
        return TrainingProgress(sampler_seed=cfg.seed, batch_size=global_batch)
    progress = load_sharded_state(resume_dir / "state", model, optimizer, scheduler)
    if progress.batch_size not in (None, global_batch):
        raise ConfigError(f"resume: {resume_dir.name} was written with a global micro-batch of "
                          f"{progress.batch_size} (batch_size x world size), not {global_batch}; "
                          f"set batch_size={progress.batch_size // world_size()} for {world_size()} rank(s)")
    sampler.seed = progress.sampler_seed
    say(f"resumed from {resume_dir} (step {progress.step}, epoch {progress.epoch})")
    return progress


def save_checkpoint(cfg, manager: CheckpointManager, progress: TrainingProgress, *, model: nn.Module, optimizer,
                    scheduler, dtype: torch.dtype, final: bool) -> Path:
    """Write ``step_N`` exactly as one device does (collective: every rank calls).

    All ranks gather the full adapter (and, for a merged export, the full model) and optimizer
    state onto rank 0, which loads them into a CPU "export model" and writes the folder with
    ``recipe_setup.save_checkpoint`` (COMPLETE last); the others wait at a barrier, so no
    rank runs ahead of a half-written checkpoint.

    Args:
        cfg: the recipe config (save_merged, lora, quantize, checkpoint_dir, tokenizer).
        manager, progress: as ``recipe_setup.save_checkpoint``.
        model, optimizer, scheduler: the sharded model and its optimizer and scheduler.
        dtype: the base weight dtype (of the export model).
        final: the end-of-training save (``save_merged: final`` applies).
    """
    merged = cfg.save_merged == "always" or (final and cfg.save_merged == "final")
    full_state = gather_full_state(model, trainable_only=not merged)
    full_optimizer = gathered_optimizer_state(optimizer)
    if is_rank0():
        # parameters missing from full_state (adapter-only saves) stay on meta: no memory
        export = build_meta_model(model.args, dtype, cfg.lora, cfg.quantize)
        export.load_state_dict(full_state, strict=False, assign=True)
        frozen_optimizer = types.SimpleNamespace(state_dict=lambda: full_optimizer)
        recipe_setup.save_checkpoint(cfg, manager, progress, model=export, optimizer=frozen_optimizer,
                                     scheduler=scheduler, final=final)
    barrier()
    return manager.output_dir / f"step_{progress.step}"


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Clip the (sharded) gradients to ``max_norm`` (None: only measure); returns the norm over
    all ranks' shards, the number one device would log."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def rank0_metrics(cfg, output_dir: Path, step: int, total_steps: int):
    """``(MetricsLogger, ProgressDisplay)`` on rank 0 (rows a killed run logged after the step
    it resumes from dropped), ``(None, None)`` on the other ranks."""
    if not is_rank0():
        return None, None
    return recipe_setup.open_metrics(cfg, output_dir, step, total_steps)
