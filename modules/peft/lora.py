"""LoRA: a frozen linear layer plus a trainable low-rank update.

``LoRALinear`` computes ``y = x W0^T + (alpha / r) * B(A(dropout(x)))`` (Hu et al., 2021). The
helpers in this file put LoRA into a model by leaf name (``apply_lora``), pick out the adapter
parameters, switch the adapters off (the DPO reference model is the same model with adapters
disabled) and merge them into plain weights for export.

Parameter names follow the native layout: the base stays ``<module>.weight`` and the adapter adds
``<module>.lora_a.weight`` ([r, in]) and ``<module>.lora_b.weight`` ([out, r]) (DoRA also
``<module>.lora_magnitude`` [out]), so a LoRA model's state dict loads base checkpoints by name
with ``strict=False``.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.kernels import lora_linear, use_triton
from tunelab.kernels.lora import lora_linear_group
from tunelab.kernels.lora_mlp import MAX_RANK, lora_swiglu

__all__ = [
    "EXPERT_TARGET",
    "ExpertLoRA",
    "LoRALinear",
    "add_bias",
    "apply_expert_lora",
    "expert_lora_modules",
    "check_lora_args",
    "frozen_bias",
    "apply_lora",
    "apply_lora_to_modules",
    "register_lora_base",
    "resolve_lora_targets",
    "lora_modules",
    "linear_layer_names",
    "get_adapter_params",
    "set_trainable_params",
    "disable_adapters",
    "merge_lora_state_dict",
    "merge_lora_",
    "merged_lora_weight",
]

# The "all-linear" shorthand (as in PEFT) targets every linear layer except the output head:
# adapting the [vocab, dim] head costs many parameters and is rarely wanted.
ALL_LINEAR = "all-linear"
_OUTPUT_LEAF = "output"


class LoRALinear(nn.Module):
    """A linear layer with a frozen base weight (and optional frozen bias) and a trainable
    low-rank adapter.

    .. math::

        y = x W_0^T + b_0 + \\frac{\\alpha}{r} \\, B A \\, \\mathrm{dropout}(x)

    where ``W0`` ([out, in]) is frozen, ``A = lora_a.weight`` ([r, in]) starts kaiming-uniform
    (as ``nn.Linear`` does) and ``B = lora_b.weight`` ([out, r]) starts at zero, so a fresh
    adapter leaves the output unchanged. Dropout acts on the adapter's input only (train mode).

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: adapter rank ``r`` (>= 1).
        alpha: scaling numerator; the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the adapter path.
        weight: optional existing base weight [out_dim, in_dim] to use as-is (no copy; may be on
            the meta device). Default: a new kaiming-uniform weight.
        adapter_dtype: dtype of ``lora_a``/``lora_b`` (default: the base weight's dtype). Inputs
            are cast to it on the adapter path and the update is cast back, so fp32 adapters
            work on a bf16 base.
        bias: optional existing base bias [out_dim] (Qwen2's q/k/v), frozen like the weight.
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024, as PEFT computes it): a
            trainable magnitude per output feature ``m = lora_magnitude`` ([out], starting at the
            row norms of ``W0 + (alpha/r) B A``) rescales each output row,
            ``y = m / ||W0 + (alpha/r) B A||_row * (x W0^T + (alpha/r) B A x) + b0``; the norm is
            a constant in backward (detached, as the paper and PEFT do). With dropout the base
            term of the update uses the dropped-out input, as PEFT's:
            ``y = x W0^T + b0 + (m/n - 1) * x_d W0^T + (m/n) (alpha/r) B A x_d``.

    Shapes: ``x`` [..., in_dim] -> [..., out_dim].

    Attributes:
        disabled: when True the adapter is skipped and the layer is the frozen base linear.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        weight: torch.Tensor | None = None,
        adapter_dtype: torch.dtype | None = None,
        bias: torch.Tensor | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        check_lora_args(rank, alpha, dropout)
        if weight is None:
            weight = torch.empty(out_dim, in_dim)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif tuple(weight.shape) != (out_dim, in_dim):
            raise ValueError(
                f"base weight has shape {tuple(weight.shape)}, want {(out_dim, in_dim)}"
            )
        if isinstance(weight, nn.Parameter):
            weight.requires_grad_(False)  # reuse the caller's Parameter object (no copy)
        else:
            weight = nn.Parameter(weight, requires_grad=False)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.weight = weight
        self.register_parameter("bias", frozen_bias(bias))
        factory = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        self.lora_a = nn.Linear(in_dim, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, **factory)
        self.lora_magnitude = nn.Parameter(torch.empty(out_dim, **factory)) if use_dora else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``, reusing its weight (and bias) Parameter (no copy).

        Works when the weight is on the meta device (the adapter is then created on meta too;
        call ``reset_lora_parameters()`` after materialising it).
        """
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            dropout,
            weight=linear.weight,
            adapter_dtype=adapter_dtype,
            bias=linear.bias,
            use_dora=use_dora,
        )

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude is not None

    def reset_lora_parameters(self) -> None:
        """(Re)initialise the adapter: A kaiming-uniform(a=sqrt(5)) like nn.Linear, B zeros
        (DoRA: the magnitude to the base's row norms, unless it is still on the meta device)."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        if self.use_dora and not self.lora_magnitude.is_meta:
            self.init_magnitude()

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """DoRA: set the magnitude to the row norms of the current ``W0 + (alpha/r) B A``, so the
        layer computes what plain LoRA does with these A and B (PEFT's initialisation)."""
        self.lora_magnitude.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """DoRA's ``||W0 + (alpha/r) B A||`` per output row ([out], fp32, no gradient).

        Computed without the [out, in] update ``B A``: with ``s = alpha / r``,
        ``||W0_i + s (BA)_i||^2 = ||W0_i||^2 + 2 s (W0 A^T)_i . B_i + s^2 B_i (A A^T) B_i^T``,
        so besides reading the base weight once it costs one [out, in] x [in, r] product and
        [out, r] / [r, r] temporaries. The base is read as :meth:`dense_base_weight` gives it:
        the Parameter itself for a dense base, a dequantized temporary for NF4.
        """
        w = self.dense_base_weight()  # [out, in]
        a, b = self.lora_a.weight.float(), self.lora_b.weight.float()  # [r, in], [out, r]
        s = self.scaling
        w_a = (w @ self.lora_a.weight.to(w.dtype).T).float()  # [out, r]
        square = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
        square = square + 2 * s * (w_a * b).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
        return square.clamp_min(0).sqrt()

    # The two paths are separate methods so that a quantized base weight (NF4) or a fused
    # autograd function can replace one without touching the other.
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen path ``x W0^T + b0``."""
        return F.linear(x, self.weight, self.bias)

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x W0^T`` without the bias (DoRA rescales this part only)."""
        return F.linear(x, self.weight)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapter path ``scaling * B A dropout(x)``, computed in x's dtype.

        Mixed precision: the adapter weights are stored and optimised in their own dtype (fp32
        on a bf16 base), but the matmuls run in the activation dtype, on weights cast down (A is
        only [r, in]). Casting the [tokens, in] activations up to fp32 instead cost a third of
        the 8B step time on an H200 (bench/results/h200.jsonl, adapters=fp32 vs bf16).
        """
        a = self.lora_a.weight.to(x.dtype)
        b = self.lora_b.weight.to(x.dtype)
        return F.linear(F.linear(self.dropout(x), a), b) * self.scaling  # [..., r] -> [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_forward(x)
        if self.use_dora:
            return self._dora_forward(x)
        base = self.fused_base(x)
        if base is not None:
            # One autograd node that reuses x for both paths and skips W0's gradient.
            return add_bias(lora_linear(x, base, self.lora_a.weight, self.lora_b.weight, self.scaling), self)
        return self.base_forward(x) + self.adapter_forward(x)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        # m / ||W0 + s B A|| per output row; the norm is a constant for autograd
        scale = (self.lora_magnitude / self.weight_norm()).to(x.dtype)  # [out]
        if self.training and self.dropout_p > 0:  # PEFT's form: the update's base term sees x_d
            dropped = self.dropout(x)
            a, b = self.lora_a.weight.to(x.dtype), self.lora_b.weight.to(x.dtype)
            update = F.linear(F.linear(dropped, a), b) * self.scaling
            return self.base_forward(x) + (scale - 1) * self.base_matmul(dropped) + scale * update
        base = self.fused_base(x)  # x W0^T + s B A x in one node where the kernels apply
        if base is not None:
            combined = lora_linear(x, base, self.lora_a.weight, self.lora_b.weight, self.scaling)
        else:
            combined = self.base_matmul(x) + self.adapter_forward(x)
        return add_bias(combined * scale, self)

    def fused_base(self, x: torch.Tensor):
        """The base weight for the fused LoRA function (``tunelab.kernels.lora_linear``), or
        None where the unfused module path runs: no active dropout, the kernels switched on for
        x's device, and a dense base in x's dtype. A quantized subclass returns a function that
        dequantizes its base instead (see ``lora_linear``)."""
        if not self._fused_applies(x) or type(self).base_forward is not LoRALinear.base_forward:
            return None
        return self.weight if self.weight.dtype == x.dtype else None

    def _fused_applies(self, x: torch.Tensor) -> bool:
        return use_triton(x) and (self.dropout_p == 0.0 or not self.training)

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a plain dense tensor (a quantized subclass dequantizes here)."""
        return self.weight

    def merged_weight(self) -> torch.Tensor:
        """``W0 + scaling * B @ A`` computed in fp32, returned in the base weight's dtype (DoRA:
        each row then rescaled to its magnitude, ``m / ||W0 + s B A||_row``)."""
        base = self.dense_base_weight()
        merged = merged_lora_weight(base, self.lora_a.weight, self.lora_b.weight, self.scaling, self.lora_magnitude)
        return merged.to(base.dtype)

    # Fused paths for a decoder layer's groups of projections, found on the layer type by
    # tunelab.modules.projections (the plain modules never import this file).
    @staticmethod
    def fused_project(x: torch.Tensor, *layers: nn.Module, unread: bool = False) -> tuple[torch.Tensor, ...]:
        return project(x, *layers, unread=unread)

    @staticmethod
    def fused_project_onto(x: torch.Tensor, layer: nn.Module, residual: torch.Tensor) -> torch.Tensor:
        return project_onto(x, layer, residual)

    @staticmethod
    def fused_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, *, unread: bool = False,
                  residual: torch.Tensor | None = None) -> torch.Tensor | None:
        return lora_mlp(x, gate, up, down, unread=unread, residual=residual)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
            f"alpha={self.alpha}, dropout={self.dropout_p}, disabled={self.disabled}"
            + (", dora=True" if self.use_dora else "")
        )


class ExpertLoRA(nn.Module):
    """LoRA on a stacked expert weight ``W`` [E, out, in] (an MoE layer's ``gate_up_proj`` or
    ``down_proj``): expert e's update is ``scaling * B[e] @ A[e]``, with ``A = lora_a`` [E, r, in]
    (kaiming-uniform, as nn.Linear) and ``B = lora_b`` [E, out, r] (zeros). This is PEFT's LoRA
    on a 3-d parameter (``target_parameters``), whose flat ``lora_A`` [E*r, in] and ``lora_B``
    [out, r*E] (expert index fastest) the adapter files hold (``tunelab.models.adapters``). No
    dropout: PEFT has none on parameters.

    Args:
        n_experts, in_dim, out_dim: the weight's shape.
        rank, alpha: as in ``LoRALinear``.
        device, dtype: of the adapter weights.
        transposed: the weight is stored [E, in, out] (gpt-oss's experts, PEFT's
            ``is_transposed``): the same factors, the merged update transposed.

    Attributes:
        disabled: when True the update is skipped (the DPO reference).
    """

    def __init__(self, n_experts: int, in_dim: int, out_dim: int, rank: int, alpha: float, *,
                 device=None, dtype=None, transposed: bool = False) -> None:
        super().__init__()
        check_lora_args(rank, alpha, 0.0)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.transposed = transposed
        self.lora_a = nn.Parameter(torch.empty(n_experts, rank, in_dim, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(n_experts, out_dim, rank, device=device, dtype=dtype))
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        for a in self.lora_a:  # per expert, like the [r, in] A of a LoRALinear
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def update(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s update for its tokens h [n, in] -> [n, out], in h's dtype."""
        a, b = self.lora_a[e].to(h.dtype), self.lora_b[e].to(h.dtype)
        return F.linear(F.linear(h, a), b) * self.scaling

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + scaling * B @ A`` per expert (transposed for an [E, in, out] weight), in fp32,
        returned in W's dtype."""
        delta = torch.einsum("eor,eri->eio" if self.transposed else "eor,eri->eoi", self.lora_b.float(),
                             self.lora_a.float())
        return (weight.float() + self.scaling * delta.to(weight.device)).to(weight.dtype)

    def extra_repr(self) -> str:
        e, r, i = self.lora_a.shape
        return f"experts={e}, in_dim={i}, out_dim={self.lora_b.shape[1]}, rank={r}, alpha={self.alpha}"


EXPERT_TARGET = "experts"  # lora.targets name for LoRA on every MoE layer's expert weights
_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def expert_lora_modules(model: nn.Module) -> Iterator[tuple[str, ExpertLoRA]]:
    """Yield ``(name, ExpertLoRA)`` for every expert LoRA in ``model``
    (``layers.1.mlp.experts.gate_up_lora`` ...)."""
    for name, m in model.named_modules():
        if isinstance(m, ExpertLoRA):
            yield name, m


def apply_expert_lora(model: nn.Module, rank: int, alpha: float, *, adapter_dtype: torch.dtype | None = None) -> int:
    """Put an ``ExpertLoRA`` on the ``gate_up_proj`` and ``down_proj`` of every MoE layer's
    experts (as ``gate_up_lora`` / ``down_lora``, which the experts' forward applies).

    Returns:
        The number of expert modules adapted (0: the model has no MoE layers).
    """
    from tunelab.modules.moe import BiasedExperts, Experts

    count = 0
    for _, m in model.named_modules():  # dense or NF4 [E, out, in] stacks; gpt-oss's [E, in, out]
        if isinstance(m, (Experts, BiasedExperts)):
            transposed = isinstance(m, BiasedExperts)
            for w in _EXPERT_WEIGHTS:
                ref = getattr(m, w)
                e, out_dim, in_dim = ref.shape if not transposed else (ref.shape[0], ref.shape[2], ref.shape[1])
                setattr(m, w.replace("_proj", "_lora"), ExpertLoRA(e, in_dim, out_dim, rank, alpha, device=ref.device,
                                                                   dtype=adapter_dtype or ref.dtype,
                                                                   transposed=transposed))
            count += 1
    return count


def frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    """``bias`` as a frozen Parameter (the caller's Parameter object reused), or None."""
    if bias is None:
        return None
    if isinstance(bias, nn.Parameter):
        return bias.requires_grad_(False)
    return nn.Parameter(bias, requires_grad=False)


def merged_lora_weight(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                       magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 + scaling * B @ A`` in fp32 on ``base``'s device; with a DoRA ``magnitude`` [out]
    each row is then rescaled to it: ``m_i * row_i / ||row_i||``.

    Args:
        base: the dense base weight ``W0`` [out, in].
        a, b: ``lora_a`` [r, in] and ``lora_b`` [out, r].
        scaling: ``alpha / r``.
        magnitude: DoRA's magnitude vector, or None for plain LoRA.
    """
    delta = b.detach().float() @ a.detach().float()  # [out, r] @ [r, in]
    merged = base.detach().float() + scaling * delta.to(base.device)
    if magnitude is not None:
        merged = merged * (magnitude.detach().float().to(base.device) / torch.linalg.vector_norm(merged, dim=1))[:, None]
    return merged


def add_bias(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``y + layer.bias`` in y's dtype where the layer has a bias (the fused LoRA functions
    compute the bias-free part), else ``y``."""
    bias = getattr(layer, "bias", None)
    return y if bias is None else y + bias.to(y.dtype)


def _frozen_fused_base(layer: nn.Module, x: torch.Tensor):
    """The base ``layer`` hands the fused LoRA functions for ``x`` if it is an active LoRA layer
    on the fused path with a frozen base (what the grouped and output-skipping calls need), else None.
    DoRA layers run on their own (their rows are rescaled after the fused product)."""
    if not isinstance(layer, LoRALinear) or layer.disabled or layer.use_dora:
        return None
    base = layer.fused_base(x)
    return None if isinstance(base, torch.Tensor) and base.requires_grad else base


def project(x: torch.Tensor, *layers: nn.Module, unread: bool = False) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` for projections of one input (q/k/v, gate/up),
    as one fused LoRA node (:func:`~tunelab.kernels.lora.lora_linear_group`: the input read
    once for all adapters, one input-gradient buffer) where every layer is an active LoRA
    layer on the fused path with a frozen base; layer by layer otherwise.

    Args:
        x: the shared input [..., in].
        layers: the projections.
        unread: the caller will not read the results (activation checkpointing's recompute of
            projections whose backward needs only their input): fused LoRA layers then skip
            their base GEMMs and save the same tensors for backward; other layers run as usual.
    """
    if len(layers) == 1 and not unread:
        return (layers[0](x),)
    bases = [_frozen_fused_base(m, x) for m in layers]
    if all(b is not None for b in bases):
        if len(layers) > 1 and len({m.lora_a.weight.dtype for m in layers}) == 1:
            outs = lora_linear_group(x, bases, [m.lora_a.weight for m in layers], [m.lora_b.weight for m in layers],
                                     [m.scaling for m in layers], compute_outputs=not unread)
            return outs if unread else tuple(add_bias(y, m) for y, m in zip(outs, layers))
    if unread:  # nobody reads the outputs: no bias added to them
        return tuple(m(x) if b is None else
                     lora_linear(x, b, m.lora_a.weight, m.lora_b.weight, m.scaling, compute_output=False)
                     for m, b in zip(layers, bases))
    return tuple(m(x) for m in layers)


def project_onto(x: torch.Tensor, layer: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """``residual + layer(x)`` (a projection back onto the residual stream): for an active LoRA
    layer on the fused path with a frozen base, the add happens inside its rank-r GEMM
    (``lora_linear``'s ``residual``) instead of as a separate pass over [tokens, dim]."""
    base = _frozen_fused_base(layer, x)
    if base is None or residual.dtype != x.dtype or layer.bias is not None:
        return residual + layer(x)
    return lora_linear(x, base, layer.lora_a.weight, layer.lora_b.weight, layer.scaling, residual=residual)


def lora_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, unread: bool = False,
             residual: torch.Tensor | None = None):
    """``down(silu(gate(x)) * up(x))`` as one fused LoRA node (:func:`~tunelab.kernels.lora_mlp.lora_swiglu`:
    the gate / up updates added inside the SwiGLU kernels, the down projection's input-gradient
    update in its backward) where all three are active LoRA layers on the fused path with frozen
    bases, one adapter dtype and ranks the SwiGLU kernels take (``MAX_RANK``); None otherwise
    (the caller runs the projections one by one, on their own fused paths).

    Args:
        x: the MLP input [..., dim].
        gate, up, down: the three projections.
        unread: the caller will not read the result (a checkpoint recompute): the down
            projection's base GEMM is skipped.
        residual: optional [..., dim] added to the result inside the down projection's GEMMs
            (as :func:`project_onto`).
    """
    layers = (gate, up, down)
    bases = [_frozen_fused_base(m, x) for m in layers]
    if (any(b is None for b in bases) or any(m.bias is not None for m in layers)
            or len({m.lora_a.weight.dtype for m in layers}) > 1
            or max(m.rank for m in layers) > MAX_RANK or (residual is not None and residual.dtype != x.dtype)):
        return None
    return lora_swiglu(x, bases, [m.lora_a.weight for m in layers], [m.lora_b.weight for m in layers],
                       [m.scaling for m in layers], compute_output=not unread, residual=residual)


def check_lora_args(rank: int, alpha: float, dropout: float) -> None:
    """A positive integer rank, a positive finite alpha, a dropout in [0, 1).

    Raises:
        ConfigError: one line naming the ``lora.`` key.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora.rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ConfigError(f"lora.alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout!r}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


# Layer types besides nn.Linear that LoRA can wrap, with the function that wraps one. A
# quantized layer registers itself where it is defined (tunelab.modules.nf4 registers
# NF4Linear), so this module never imports them and apply_lora is the one entry point.
_LORA_BASES: dict[type[nn.Module], Callable[..., LoRALinear]] = {}


def register_lora_base(layer_type: type[nn.Module], make_lora: Callable[..., LoRALinear]) -> None:
    """Let ``apply_lora`` put adapters on layers of ``layer_type``.

    Args:
        layer_type: a linear-like module class (with ``in_features`` / ``out_features``).
        make_lora: ``make_lora(layer, rank, alpha, dropout, adapter_dtype=None, use_dora=False)``
            returns the ``LoRALinear`` (subclass) that replaces ``layer``, keeping its frozen base.
    """
    _LORA_BASES[layer_type] = make_lora


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers (``nn.Linear``, ``LoRALinear`` or a registered
    base type such as ``NF4Linear``), not counting the ``lora_a``/``lora_b`` inside a LoRALinear."""
    kinds = (nn.Linear, LoRALinear, *_LORA_BASES)
    lora_parents = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [
        name
        for name, m in model.named_modules()
        if name
        and isinstance(m, kinds)
        and name.rpartition(".")[0] not in lora_parents
    ]


def _linear_leaf_names(model: nn.Module) -> set[str]:
    return {name.rpartition(".")[2] for name in linear_layer_names(model)}


def resolve_lora_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full module names of the linear layers that ``targets`` selects.

    Args:
        model: the model to search.
        targets: leaf attribute names (e.g. ``["q_proj", "v_proj", "output"]``) or
            ``"all-linear"`` (every linear layer except ``output``).

    Raises:
        ConfigError: a target name matches no linear layer (the message lists the valid ones).
    """
    linears = [
        n for n in linear_layer_names(model) if not isinstance(model.get_submodule(n), LoRALinear)
    ]
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            raise ConfigError(
                f"lora.targets must be a list of layer names or '{ALL_LINEAR}', got {targets!r}"
            )
        return [n for n in linears if n.rpartition(".")[2] != _OUTPUT_LEAF]
    wanted = list(dict.fromkeys(targets))
    if not wanted:
        raise ConfigError("lora.targets is empty; name at least one layer, e.g. [q_proj, v_proj]")
    valid = sorted(_linear_leaf_names(model))
    unknown = [t for t in wanted if t not in valid]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(str(t), valid, n=1)
            hints.append(f"{t!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"lora.targets: unknown layer name(s) {', '.join(hints)}; valid: {', '.join(valid)}"
        )
    chosen = [n for n in linears if n.rpartition(".")[2] in wanted]
    already = [t for t in wanted if t not in {n.rpartition(".")[2] for n in chosen}]
    if already:
        raise ConfigError(f"lora.targets: {', '.join(already)} already have LoRA applied")
    return chosen


def apply_lora_to_modules(
    model: nn.Module,
    module_names: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    adapter_dtype: torch.dtype | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Replace the named linear modules (full dotted names; ``nn.Linear`` or a type registered
    with :func:`register_lora_base`) by ``LoRALinear`` (DoRA with ``use_dora``) in place."""
    check_lora_args(rank, alpha, dropout)
    for name in module_names:
        layer = model.get_submodule(name)
        make = next((f for kind, f in _LORA_BASES.items() if isinstance(layer, kind)), None)
        if make is not None:
            lora = make(layer, rank, alpha, dropout, adapter_dtype=adapter_dtype, use_dora=use_dora)
        elif isinstance(layer, nn.Linear):
            lora = LoRALinear.from_linear(layer, rank, alpha, dropout, adapter_dtype=adapter_dtype, use_dora=use_dora)
        else:
            raise ValueError(f"{name} is {type(layer).__name__}, not a linear layer LoRA can wrap")
        lora.train(layer.training)
        _set_submodule(model, name, lora)
    return model


def apply_lora(
    model: nn.Module,
    targets: str | Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    adapter_dtype: torch.dtype | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Put LoRA on every linear layer whose attribute name is in ``targets`` (in place).

    ``nn.Linear`` layers become ``LoRALinear``; quantized ones (``NF4Linear`` of a QLoRA model)
    become their registered LoRA form (``NF4LoRALinear``, 4-bit base kept). The base weight Parameters are reused (no copy, meta tensors stay meta) and frozen; the
    adapters are created on the base weight's device. Other parameters keep their
    ``requires_grad``; call ``set_trainable_params`` to train the adapters only.

    Args:
        model: e.g. a native ``TransformerDecoder``.
        targets: leaf names such as ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
            "up_proj", "down_proj"]`` (add ``"output"`` for the LM head, ``"experts"`` for the
            expert weights of an MoE model, see ``ExpertLoRA``), or ``"all-linear"``.
        rank: adapter rank.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter input.
        adapter_dtype: dtype of the adapter weights (default: the base weight's dtype).
        use_dora: DoRA instead of plain LoRA (a magnitude vector per adapted layer; see
            :class:`LoRALinear`).

    Returns:
        The same model.

    Raises:
        ConfigError: a target matches no linear layer, rank/alpha/dropout is out of range, or
            DoRA is asked for on expert weights.
    """
    check_lora_args(rank, alpha, dropout)
    if not isinstance(targets, str) and EXPERT_TARGET in targets:
        if use_dora:
            raise ConfigError(f"lora.use_dora: DoRA is not available for '{EXPERT_TARGET}' (stacked expert "
                              f"weights); drop '{EXPERT_TARGET}' from lora.targets or set lora.use_dora: false")
        if dropout:
            raise ConfigError(f"lora.dropout={dropout} with '{EXPERT_TARGET}' in lora.targets: expert LoRA has no "
                              "dropout (as PEFT's on parameters); set lora.dropout: 0.0")
        if not apply_expert_lora(model, rank, alpha, adapter_dtype=adapter_dtype):
            raise ConfigError(f"lora.targets: '{EXPERT_TARGET}' needs a mixture-of-experts model; this one has no "
                              "experts")
        targets = [t for t in targets if t != EXPERT_TARGET]
        if not targets:
            return model
    names = resolve_lora_targets(model, targets)
    return apply_lora_to_modules(model, names, rank, alpha, dropout, adapter_dtype=adapter_dtype, use_dora=use_dora)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(name, module)`` for every LoRALinear in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter Parameters by full name, e.g. ``layers.0.attn.q_proj.lora_a.weight``."""
    params = {}
    for name, m in lora_modules(model):
        prefix = f"{name}." if name else ""
        params[f"{prefix}lora_a.weight"] = m.lora_a.weight
        params[f"{prefix}lora_b.weight"] = m.lora_b.weight
        if m.use_dora:
            params[f"{prefix}lora_magnitude"] = m.lora_magnitude
    for name, m in expert_lora_modules(model):
        params[f"{name}.lora_a"], params[f"{name}.lora_b"] = m.lora_a, m.lora_b
    return params


def set_trainable_params(model: nn.Module) -> int:
    """Make the adapter weights the only parameters that require grad.

    Returns:
        The number of trainable elements (sum of ``numel`` over the adapter weights).
    """
    adapter = {id(p) for p in get_adapter_params(model).values()}
    total = 0
    for p in model.parameters():
        trainable = id(p) in adapter
        p.requires_grad_(trainable)
        total += p.numel() if trainable else 0
    return total


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run ``model`` without its LoRA adapters (e.g. the DPO reference).

    Each module's previous ``disabled`` flag is restored on exit, also after an exception.
    """
    modules = [m for _, m in lora_modules(model)] + [m for _, m in expert_lora_modules(model)]
    previous = [m.disabled for m in modules]
    try:
        for m in modules:
            m.disabled = True
        yield model
    finally:
        for m, flag in zip(modules, previous):
            m.disabled = flag


@torch.no_grad()
def merge_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter merged into its base weight.

    Keys are the native names without any ``lora_*`` entries; each merged weight is
    ``W0 + (alpha/r) B @ A`` (DoRA: rescaled per row, see ``LoRALinear.merged_weight``) computed in fp32 and cast to the base weight's dtype. Adapters that
    are ``disabled`` are merged as well (the flag is a runtime switch, not part of the weights).
    The model is not modified.
    """
    state = model.state_dict()
    for name, m in lora_modules(model):
        prefix = f"{name}." if name else ""
        for key in ("lora_a.weight", "lora_b.weight", "lora_magnitude"):
            state.pop(prefix + key, None)
        state[prefix + "weight"] = m.merged_weight()
    for name, m in expert_lora_modules(model):  # layers.1.mlp.experts.gate_up_lora -> ....gate_up_proj
        state.pop(f"{name}.lora_a"), state.pop(f"{name}.lora_b")
        weight = name.removesuffix("_lora") + "_proj"
        state[weight] = m.merged(state[weight])
    return state


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an ``nn.Linear`` holding the merged weight (in place).

    The new linear layers are frozen like the base weights were. Returns the same model.
    """
    for name, m in list(lora_modules(model)):
        merged = m.merged_weight()
        linear = nn.Linear(m.in_dim, m.out_dim, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=False)
        if m.bias is not None:
            linear.bias = m.bias
        linear.train(m.training)
        if name:
            _set_submodule(model, name, linear)
        else:
            raise ValueError("merge_lora_ needs a model that contains LoRALinear layers")
    return model
