"""Linear layers over an NF4 base: ``NF4Linear`` (frozen) and ``NF4LoRALinear`` (QLoRA).

The forward pass dequantizes the 4-bit weight to the activations' dtype, multiplies, and drops
the dense copy. The backward pass needs ``grad_input = grad_output @ W`` only (the base is
frozen, so there is no weight gradient and the input is not saved either): it dequantizes W
again instead of keeping a bf16 copy alive between forward and backward. That is the whole
memory argument of QLoRA: the model costs ~0.52 bytes per parameter at every point of a step.

Both layers present the model's state dict as if they were plain linear layers: ``state_dict()``
holds ``<name>.weight`` dequantized to the original dtype (so ``save_pretrained(model)`` and
``merge_lora_state_dict`` write an ordinary HF checkpoint), and ``load_state_dict`` accepts a
dense ``<name>.weight`` and quantizes it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.modules.nf4.weight import NF4Weight, to_nf4
from tunelab.modules.peft.lora import LoRALinear, add_bias, frozen_bias, register_lora_base

__all__ = ["NF4Linear", "NF4LoRALinear", "nf4_linear", "quantize_linears_"]

_STORAGE = ("codes", "absmax_q", "absmax_scale_bits", "absmax_offset_bits", "code", "absmax_code")


_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _dense(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` dequantized into the one dense buffer all NF4 layers share per (device, dtype).

    Each layer's dense weight lives only inside one forward or backward call (it is never
    saved), and calls on a device run in stream order, so one buffer the size of the largest
    weight serves them all: no allocation per call, and a fixed amount of memory instead of
    whatever the allocator keeps cached for every weight shape.
    """
    if weight.device.type != "cuda" or torch.compiler.is_compiling():
        # the CPU reference allocates anyway; a compiled graph plans its own buffers
        return weight.dequantize(dtype)
    key, n = (weight.device, dtype), weight.numel()
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < n:
        _workspaces[key] = buf = torch.empty(n, dtype=dtype, device=weight.device)
    return weight.dequantize(dtype, out=buf[:n])


class _NF4LinearFunction(torch.autograd.Function):
    """``x @ dequant(W)^T`` whose backward dequantizes W again (nothing weight-sized is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
        ctx.weight = weight  # a reference to the 4-bit storage, not a copy
        return F.linear(x, _dense(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = _dense(ctx.weight, grad_out.dtype)  # [out, in]
        return grad_out @ w, None  # [..., out] @ [out, in] -> [..., in]


def nf4_linear(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """``x @ W^T`` with an NF4 weight, computed in ``x.dtype``; no gradient for W.

    Args:
        x: [..., in_features].
        weight: NF4Weight of shape [out_features, in_features], on x's device.

    Returns:
        [..., out_features] in x's dtype.
    """
    return _NF4LinearFunction.apply(x, weight)


# ------------------------------------------------------------------ dense state-dict view
def _dense_state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    for name in _STORAGE:
        state_dict.pop(f"{prefix}weight.{name}", None)
    state_dict[f"{prefix}weight"] = module.weight.dequantize()


def _quantize_on_load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    dense = state_dict.pop(f"{prefix}weight", None)
    if dense is None:
        return
    w = module.weight
    if tuple(dense.shape) != tuple(w.shape):
        error_msgs.append(f"size mismatch for {prefix}weight: got {list(dense.shape)}, expected {list(w.shape)}")
        return
    fresh = to_nf4(dense.to(device=w.device, dtype=w.dtype), w.block_size, w.scaler_block_size)
    for name, buf in fresh.named_buffers():
        state_dict[f"{prefix}weight.{name}"] = buf
    # a dense weight brings the standard tables: drop foreign ones the old storage had
    w.code = None
    w.absmax_code = None


def _register_dense_view(module: nn.Module) -> None:
    module.register_state_dict_post_hook(_dense_state_dict_hook)
    module.register_load_state_dict_pre_hook(_quantize_on_load_hook)


# ------------------------------------------------------------------ layers
class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4.

    ``forward(x) = x @ dequant(W)^T (+ b)`` in ``x.dtype``. ``weight`` is an ``NF4Weight`` (call
    ``weight.dequantize()`` for the dense tensor); the only parameter is the optional bias,
    kept dense (as bitsandbytes does).

    Args:
        weight: the NF4 weight, shape [out_features, in_features].
        bias: optional [out_features] bias (frozen).

    Shapes: ``x`` [..., in_features] -> [..., out_features].
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-d weight, got shape {list(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", frozen_bias(bias))
        _register_dense_view(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, scaler_block_size: int = 256) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (on its device; its bias kept dense); the dense weight is not kept."""
        layer = cls(to_nf4(linear.weight.detach(), block_size, scaler_block_size), linear.bias)
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_bias(nf4_linear(x, self.weight), self)

    def dense_base_weight(self) -> torch.Tensor:
        """The weight dequantized to its original dtype."""
        return self.weight.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


class NF4LoRALinear(LoRALinear):
    """LoRA over an NF4 base (QLoRA): ``y = x dequant(W0)^T + (alpha / r) B A dropout(x)``.

    Everything LoRA-specific (adapters, scaling, dropout, ``disabled``, merging) is
    ``LoRALinear``'s; only the base path and the dense base weight differ. Merging
    (``merged_weight``, ``merge_lora_state_dict``) dequantizes the base to its original dtype and
    adds the update, which gives a plain dense weight: the 4-bit property is gone after a merge.

    Args:
        weight: the NF4 base weight [out_dim, in_dim] (kept as is, frozen).
        rank, alpha, dropout: as in ``LoRALinear``.
        adapter_dtype: dtype of ``lora_a``/``lora_b`` (default: the base's original dtype).
        bias: optional dense [out_dim] base bias (frozen).
    """

    def __init__(
        self,
        weight: NF4Weight,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        adapter_dtype: torch.dtype | None = None,
        bias: torch.Tensor | None = None,
        use_dora: bool = False,
    ) -> None:
        out_dim, in_dim = weight.shape
        # LoRALinear's constructor wants a dense [out, in] base: give it a zero-stride stand-in
        # (one element of memory) that fixes device and dtype, then swap the NF4 weight in.
        stand_in = torch.empty((), device=weight.device, dtype=weight.dtype).expand(out_dim, in_dim)
        super().__init__(in_dim, out_dim, rank, alpha, dropout, weight=stand_in, adapter_dtype=adapter_dtype,
                         bias=bias, use_dora=use_dora)
        del self.weight  # the stand-in Parameter
        self.weight = weight
        _register_dense_view(self)
        if use_dora and not self.lora_magnitude.is_meta:  # the stand-in gave it nothing real
            self.init_magnitude()

    @classmethod
    def from_lora(cls, lora: LoRALinear, block_size: int = 64, scaler_block_size: int = 256) -> "NF4LoRALinear":
        """Quantize the base of an existing ``LoRALinear``; its adapter modules are reused."""
        layer = cls(
            to_nf4(lora.dense_base_weight().detach(), block_size, scaler_block_size),
            lora.rank,
            lora.alpha,
            lora.dropout_p,
            adapter_dtype=lora.lora_a.weight.dtype,
            bias=lora.bias,
            use_dora=lora.use_dora,
        )
        layer.lora_a, layer.lora_b, layer.lora_magnitude = lora.lora_a, lora.lora_b, lora.lora_magnitude
        layer.disabled = lora.disabled
        return layer.train(lora.training)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_bias(nf4_linear(x, self.weight), self)

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight)

    def fused_base(self, x: torch.Tensor):
        # the fused LoRA function dequantizes the base (into the shared buffer) in its forward
        # and again in its backward: one autograd node per projection, as for a dense base
        return functools.partial(_dense, self.weight) if self._fused_applies(x) else None

    def dense_base_weight(self) -> torch.Tensor:
        return self.weight.dequantize()


# ------------------------------------------------------------------ model surgery
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


@torch.no_grad()
def quantize_linears_(module: nn.Module, skip: Iterable[str] = ("output",)) -> nn.Module:
    """Replace every ``nn.Linear`` in ``module`` by ``NF4Linear`` and every ``LoRALinear`` by
    ``NF4LoRALinear`` (adapters kept), in place, one layer at a time.

    Args:
        module: e.g. a decoder layer, or a whole model already in memory.
        skip: leaf names left dense (default: the LM head ``output``, as QLoRA does).

    Returns:
        The same module.
    """
    skip = set(skip)
    targets = [
        (name, m)
        for name, m in module.named_modules()
        if name and name.rpartition(".")[2] not in skip and type(m) in (nn.Linear, LoRALinear)
        and not name.endswith((".lora_a", ".lora_b"))
    ]
    for name, m in targets:
        new = NF4LoRALinear.from_lora(m) if isinstance(m, LoRALinear) else NF4Linear.from_linear(m)
        _set_submodule(module, name, new)
    return module


def _nf4_lora(base: NF4Linear, rank: int, alpha: float, dropout: float = 0.0, *,
              adapter_dtype: torch.dtype | None = None, use_dora: bool = False) -> NF4LoRALinear:
    return NF4LoRALinear(base.weight, rank, alpha, dropout, adapter_dtype=adapter_dtype, bias=base.bias,
                         use_dora=use_dora)


# apply_lora turns targeted NF4Linear layers into NF4LoRALinear (the 4-bit base kept), so a
# QLoRA model takes the same call as a dense one.
register_lora_base(NF4Linear, _nf4_lora)
