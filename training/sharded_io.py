"""Sharded checkpoint I/O for FSDP2: each rank reads only its rows of the HF weights, the
LoRA adapters are initialised with one device's values, full tensors are gathered onto rank 0
for saving, and a saved state (of any world size) is loaded back into the shards.

Base weights are read from the HF safetensors files file by file with
``safe_open(...).get_slice``, so a rank reads exactly the rows it owns and never holds a whole
tensor, let alone the whole model. NF4's scales are statistics of the whole tensor, so while
loading every rank quantizes each full projection (one tensor in memory at a time) and keeps
its rows of the packed result. Saving gathers full tensors (collective: every rank calls,
rank 0 keeps CPU copies) into a CPU "export model" on rank 0 that the ordinary single-device
writers of ``tunelab.training.checkpointing`` save, so the folder layout is the same as on one
device.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from tunelab.errors import CheckpointError
from tunelab.models.checkpoint import (
    expert_halves,
    expert_slot,
    native_to_hf_key,
    native_weight_name,
    open_safetensors,
    tensors_by_file,
)
from tunelab.models.mxfp4 import dense_shape, expert_tensor_from_mxfp4, mxfp4_part
from tunelab.training.checkpointing import TrainingProgress, load_state
from tunelab.training.process_group import is_rank0, rank, world_size
from tunelab.training.sharding import NF4_STORAGE, local_tensor

__all__ = [
    "full_tensor_on_rank0",
    "gather_full_state",
    "gathered_optimizer_state",
    "init_lora_sharded",
    "load_full_into_sharded",
    "load_hf_weights_sharded",
    "load_sharded_state",
    "shard_like",
]


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


def _copy_expert(params: dict, slot: tuple[str, int, int], piece, where, hf_name: str, halves: dict) -> None:
    """One expert's tensor into the rank's rows of the stacked expert parameter (experts are
    dim 0, so a rank reads only the experts it holds). NF4 experts (QLoRA): the expert is
    quantized once its halves (gate, up) are all read (``halves`` keeps them until then)."""
    name, expert, half = slot
    if name not in params:
        raise CheckpointError(f"{where}: unexpected tensor {hf_name!r}; the weights do not match config.json")
    p = params[name]
    rows = p.shape[1] // expert_halves(name)
    if tuple(piece.get_shape()) != (rows, p.shape[2]) or expert >= p.shape[0]:
        raise CheckpointError(f"{where}: tensor {hf_name!r} has shape {list(piece.get_shape())}, config.json "
                              f"expects {[rows, p.shape[2]]}; the weights do not match config.json")
    if not isinstance(p, torch.Tensor):  # NF4ExpertWeights: every rank holds a part of every expert
        parts = halves.setdefault((name, expert), {})
        parts[half] = piece[:]
        if len(parts) == expert_halves(name):
            _quantize_expert_into(p, expert, torch.cat([parts[h] for h in sorted(halves.pop((name, expert)))]))
        return
    local = p.to_local() if isinstance(p, DTensor) else p
    start, _ = _row_range(p.shape[0], local.shape[0]) if isinstance(p, DTensor) else (0, p.shape[0])
    if start <= expert < start + local.shape[0]:
        local[expert - start, half * rows:(half + 1) * rows].copy_(piece[:].to(dtype=local.dtype))


def _fill_nf4(target, dense: torch.Tensor) -> None:
    """An (FSDP-sharded) ``NF4Weight`` from the whole dense weight: quantized whole (NF4's
    scales depend on all of it), then each rank copies its rows of every storage tensor."""
    from tunelab.modules.nf4 import to_nf4

    q = to_nf4(dense.to(device=local_tensor(target.codes).device, dtype=target.dtype))
    for part in NF4_STORAGE:
        _copy_rows(getattr(target, part), lambda a, b, full=getattr(q, part): full[a:b])


def _quantize_expert_into(stack, expert: int, weight: torch.Tensor) -> None:
    """Expert ``expert`` of an ``NF4ExpertWeights`` from its dense weight in the stack's layout
    ([in, out] when ``transposed``; each expert is quantized as [out, in])."""
    _fill_nf4(stack.experts[expert], weight.t() if stack.transposed else weight)


def _read_mxfp4_part(params: dict, pending: dict, part: tuple[str, str], piece, args, where) -> str | None:
    """Keep this rank's experts (dim 0) of one half of an MXFP4 pair; once both halves are in,
    dequantize them into the rank's shard of the dense [E, in, out] parameter and return its
    name (None while the pair is incomplete)."""
    base, which = part
    name = native_weight_name(base, args, where)
    if name not in params:
        raise CheckpointError(f"{where}: unexpected tensor {base + '_' + which!r}; the weights do not match config.json")
    p = params[name]
    dense = isinstance(p, torch.Tensor)  # else NF4ExpertWeights: every rank quantizes every expert
    local = local_tensor(p) if dense else None
    start, stop = _row_range(p.shape[0], local.shape[0]) if isinstance(p, DTensor) else (0, p.shape[0])
    pair = pending.setdefault(base, {})
    pair[which] = piece[start:stop]
    if len(pair) < 2:
        return None
    pending.pop(base)
    in_out = list(dense_shape(pair["blocks"].shape)[1:])
    if in_out != list(p.shape[1:]):
        raise CheckpointError(f"{where}: {base}_blocks holds experts of shape {in_out}, config.json expects "
                              f"{list(p.shape[1:])}; the weights do not match config.json")
    if not dense:
        for e in range(p.shape[0]):  # one expert's dense copy at a time
            one = {k: v[e : e + 1] for k, v in pair.items()}
            _quantize_expert_into(p, e, expert_tensor_from_mxfp4(one, base, p.dtype, where)[0])
    elif local.numel():
        local.copy_(expert_tensor_from_mxfp4(pair, base, local.dtype, where))
    return name


@torch.no_grad()
def load_hf_weights_sharded(model: nn.Module, checkpoint_dir: str | Path) -> None:
    """Fill the (sharded, materialised) base weights of ``model`` from an HF checkpoint.

    Files are opened one at a time (memory-mapped); for each tensor a rank reads only its rows
    (``get_slice``), casts them and copies them into its shard. Every base weight must be found
    once with the shape config.json implies.

    Raises:
        CheckpointError: missing/unexpected tensors or shapes that do not match.
    """
    from tunelab.modules.nf4 import NF4ExpertWeights, NF4Weight

    params = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Weight)}  # named like the dense weight
    stacks = {n: m for n, m in model.named_modules() if isinstance(m, NF4ExpertWeights)}  # QLoRA MoE experts
    for name, w in nf4.items():
        if name.rpartition(".experts.")[0] not in stacks:  # (an expert's weight is filled through its stack)
            params[name] = w  # found by its dense name; its storage parameters are filled together
        for part in NF4_STORAGE:
            params.pop(f"{name}.{part}")
    params.update(stacks)
    halves: dict[tuple[str, int], dict[int, torch.Tensor]] = {}  # NF4 experts: gate / up until both are read
    loaded: set[str] = set()
    expert_pieces: dict[str, int] = {}  # stacked expert tensor -> per-expert tensors read
    mxfp4: dict[str, dict[str, torch.Tensor]] = {}  # gpt-oss hub experts: this rank's blocks / scales
    for file, names in tensors_by_file(checkpoint_dir).items():
        with open_safetensors(file) as f:
            for hf_name in names:
                if (part := mxfp4_part(hf_name)) is not None:
                    name = _read_mxfp4_part(params, mxfp4, part, f.get_slice(hf_name), model.args, checkpoint_dir)
                    if name is not None:
                        loaded.add(name)
                    continue
                slot = expert_slot(hf_name) if model.args.n_experts else None
                if slot is not None:
                    _copy_expert(params, slot, f.get_slice(hf_name), checkpoint_dir, hf_name, halves)
                    expert_pieces[slot[0]] = expert_pieces.get(slot[0], 0) + 1
                    continue
                name = native_weight_name(hf_name, model.args, checkpoint_dir)
                if name is None:
                    continue
                if name not in params:
                    raise CheckpointError(f"{checkpoint_dir}: unexpected tensor {hf_name!r}; the weights do "
                                          "not match config.json")
                p = params[name]
                piece = f.get_slice(hf_name)
                if tuple(piece.get_shape()) != tuple(p.shape):
                    raise CheckpointError(f"{checkpoint_dir}: tensor {hf_name!r} has shape {list(piece.get_shape())}, "
                                          f"config.json expects {list(p.shape)}; the weights do not match config.json")
                if name in stacks:  # a stored stack of experts (gpt-oss), NF4 one expert at a time
                    for e in range(p.shape[0]):
                        _quantize_expert_into(p, e, piece[e : e + 1][0])
                elif name in nf4:
                    _fill_nf4(p, piece[:])
                else:
                    _copy_rows(p, lambda a, b: piece[a:b].to(dtype=p.dtype))
                loaded.add(name)
    for name, count in expert_pieces.items():  # every expert's gate and up (or down) read once
        if count == model.args.n_experts * expert_halves(name):
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        names = ", ".join(native_to_hf_key(k, model.args) for k in missing[:3])
        raise CheckpointError(f"{checkpoint_dir}: missing tensors {names}; "
                              "the weights do not match config.json")


@torch.no_grad()
def init_lora_sharded(model: nn.Module) -> None:
    """Initialise every LoRA A/B (already sharded and materialised) with the values
    ``apply_lora`` would give on one device from the current global RNG state.

    A throw-away CPU ``LoRALinear`` per adapted layer (its base weight a zero-stride view, so
    it costs no memory) draws the numbers exactly as the single-device path does; each rank
    keeps its rows. Call it at the same point of the seeded RNG stream on every rank.
    """
    from tunelab.modules.peft import ExpertLoRA, LoRALinear, expert_lora_modules, lora_modules

    # the order apply_lora draws in: expert adapters first, then the linear layers'
    for _, m in expert_lora_modules(model):
        e, r, in_dim = m.lora_a.shape
        ghost = ExpertLoRA(e, in_dim, m.lora_b.shape[1], r, m.alpha, dtype=m.lora_a.dtype)
        for mine, full in ((m.lora_a, ghost.lora_a), (m.lora_b, ghost.lora_b)):
            _copy_rows(mine, lambda a, b: full[a:b])
    for _, m in lora_modules(model):  # (DoRA magnitudes: init_dora_sharded, once the base is loaded)
        ghost_base = torch.zeros((), dtype=m.lora_a.weight.dtype).expand(m.out_dim, m.in_dim)
        ghost = LoRALinear(m.in_dim, m.out_dim, m.rank, m.alpha, weight=ghost_base,
                           adapter_dtype=m.lora_a.weight.dtype)
        for mine, full in ((m.lora_a.weight, ghost.lora_a.weight), (m.lora_b.weight, ghost.lora_b.weight)):
            _copy_rows(mine, lambda a, b: full[a:b])


@torch.no_grad()
def init_dora_sharded(model: nn.Module) -> None:
    """DoRA magnitudes start at the row norms of ``W0 + (alpha/r) B A`` (B is 0 then: the base
    rows' norms), as on one device. The norm needs whole rows of whole weights, whichever way
    the base is held (sharded, replicated, NF4): each FSDP module owning DoRA layers is gathered
    once (``unshard``), the norms computed on the full weights, and each rank keeps its rows of
    every magnitude after ``reshard``."""
    from tunelab.modules.peft import LoRALinear

    done: set[int] = set()
    for owner in reversed([m for m in model.modules() if isinstance(m, FSDPModule)]):  # layers before the root
        doras = [m for m in owner.modules() if isinstance(m, LoRALinear) and m.use_dora and id(m) not in done]
        if not doras:
            continue
        owner.unshard()
        norms = [m.weight_norm() for m in doras]  # [out] fp32 each, full rows
        owner.reshard()
        for m, norm in zip(doras, norms):
            _copy_rows(m.lora_magnitude, lambda a, b, norm=norm: norm[a:b].to(m.lora_magnitude.dtype))
            done.add(id(m))


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

