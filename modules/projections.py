"""How a decoder layer calls its projections, with room for fused paths it does not know.

Attention and the MLP call these functions instead of their ``nn.Linear`` layers. On plain
layers they are exactly the layer calls. A layer type swapped in by composition (LoRA's
``LoRALinear``, see ``tunelab.modules.peft``) may bring a fused path for a group of
projections as a static method of the same role (``fused_project``, ``fused_project_onto``,
``fused_mlp``); these functions find it on the layers' types, so the plain modules never import
the fused code, and a model without LoRA never reaches it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mlp", "project", "project_onto"]


def _fused(layer: nn.Module, role: str):
    return getattr(type(layer), role, None)


def project(x: torch.Tensor, *layers: nn.Module, unread: bool = False) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` for projections of one input (q/k/v, gate/up).

    Args:
        x: the shared input [..., in].
        layers: the projections.
        unread: the caller will not read the results (activation checkpointing's rerun of
            projections whose backward needs only their input): a fused path may skip work
            that only produces the outputs.
    """
    for layer in layers:
        if (fused := _fused(layer, "fused_project")) is not None:
            return fused(x, *layers, unread=unread)
    return tuple(layer(x) for layer in layers)


def project_onto(x: torch.Tensor, layer: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """``residual + layer(x)``: a projection back onto the residual stream (a fused path may
    add the residual inside its GEMM)."""
    if (fused := _fused(layer, "fused_project_onto")) is not None:
        return fused(x, layer, residual)
    return residual + layer(x)


def mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, *, unread: bool = False,
        residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """``down(silu(gate(x)) * up(x))`` (+ ``residual``) as one fused node where the layers bring
    one and it applies; None otherwise (the caller runs the projections one by one).

    Args:
        x: the MLP input [..., dim].
        gate, up, down: the three projections.
        unread: the caller will not read the result (a checkpoint rerun).
        residual: optional [..., dim] added to the result.
    """
    if (fused := _fused(gate, "fused_mlp")) is None:
        return None
    return fused(x, gate, up, down, unread=unread, residual=residual)
