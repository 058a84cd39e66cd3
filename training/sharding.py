"""FSDP2 sharding of a LoRA / QLoRA model: the meta-device build, ``fully_shard`` per decoder
layer and root, explicit all-gather prefetching, and the global gradient norm.

The model is built on the meta device (no memory), LoRA is applied there, every decoder layer
and then the root are wrapped by ``fully_shard`` (each parameter split along dim 0 over the
ranks), and only then is memory allocated: each rank allocates its own shard
(``tunelab.training.sharded_io`` then reads its rows of the weights).

QLoRA: the decoder projections are ``NF4Linear`` layers whose packed 4-bit storage (codes,
8-bit block scales, fp32 scale bits) is registered as frozen integer *parameters*, so FSDP
shards it along dim 0 and all-gathers the packed bytes (integer parameters are never cast by
the mixed-precision policy); a layer's forward/backward dequantizes the gathered storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tunelab.errors import ConfigError

__all__ = [
    "FSDPConfig",
    "NF4_STORAGE",
    "build_meta_model",
    "check_nf4_sharding_supported",
    "check_prefetch_layers",
    "clip_grad_norm",
    "local_tensor",
    "shard_model",
]


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
    """The LoRA (or QLoRA) model on the meta device, adapters fp32, only adapters trainable
    (``lora_cfg=None``: the plain model, every weight trainable: full fine-tuning).

    With ``quantize="nf4"`` every decoder-block projection becomes an ``NF4Linear`` (an MoE
    layer's experts an ``NF4ExpertWeights``, one NF4 weight per expert) whose storage is held as
    frozen integer parameters (what FSDP shards: every expert's storage is split over the ranks),
    then ``apply_lora`` puts the adapters on (NF4LoRALinear there), in the same order as one
    device does.
    """
    from tunelab.models import build_model
    from tunelab.modules.peft import apply_lora, set_trainable_params

    model = build_model(args, device="meta", dtype=dtype)
    if quantize == "nf4":
        from tunelab.models.quantize import is_decoder_linear
        from tunelab.modules.moe import BiasedExperts, Experts
        from tunelab.modules.nf4 import NF4ExpertWeights, NF4Linear, NF4Weight

        for i, layer in enumerate(model.layers):
            for name, m in list(layer.named_modules()):
                parent, _, leaf = name.rpartition(".")
                # the projections one device quantizes (an MoE router stays dense, as there)
                if type(m) is nn.Linear and is_decoder_linear(f"layers.{i}.{name}.weight"):
                    nf4 = NF4Linear(_meta_nf4(tuple(m.weight.shape), dtype), m.bias)
                    setattr(layer.get_submodule(parent), leaf, nf4)
                elif isinstance(m, (Experts, BiasedExperts)):  # one NF4 weight [out, in] per expert
                    transposed = isinstance(m, BiasedExperts)  # its stacks are [E, in, out]
                    for stack in ("gate_up_proj", "down_proj"):
                        e, rows, cols = getattr(m, stack).shape
                        delattr(m, stack)
                        per_expert = [_meta_nf4((cols, rows) if transposed else (rows, cols), dtype) for _ in range(e)]
                        setattr(m, stack, NF4ExpertWeights(per_expert, transposed=transposed))
        for w in [m for m in model.modules() if isinstance(m, NF4Weight)]:
            for name in NF4_STORAGE:
                w.register_parameter(name, nn.Parameter(w._buffers.pop(name), requires_grad=False))
    elif quantize is not None:
        raise ConfigError(f"quantize: {quantize!r} is not supported; use nf4 (QLoRA) or null")
    if lora_cfg is None:  # full fine-tuning: every weight trains
        return model.requires_grad_(True)
    apply_lora(model, lora_cfg.targets, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, adapter_dtype=torch.float32,
               use_dora=lora_cfg.use_dora)
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
    check_prefetch_layers(prefetch_layers)
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


def check_prefetch_layers(prefetch_layers: int) -> None:
    if isinstance(prefetch_layers, bool) or not isinstance(prefetch_layers, int) or prefetch_layers < 0:
        raise ConfigError(f"fsdp.prefetch_layers must be an integer >= 0 (0 = FSDP2's own overlap, k = "
                          f"all-gather the next k layers ahead), got {prefetch_layers!r}")




def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: its shard of a DTensor, a plain (replicated) tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t



def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Clip the (sharded) gradients to ``max_norm`` (None: only measure); returns the norm over
    all ranks' shards, the number one device would log."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()

