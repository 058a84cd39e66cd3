"""Pieces of the training step that every LoRA recipe shares (one copy, not one per recipe)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["wrap_layers"]


def wrap_layers(model: nn.Module, *, activation_checkpointing: bool, compile_layers: bool) -> nn.Module:
    """Activation checkpointing and/or ``torch.compile`` per decoder layer, in place.

    Swapping each layer's ``forward`` (not wrapping the module) keeps parameter names, so
    checkpoints do not change, and leaves FSDP2's module hooks outside the checkpoint (the
    recompute in backward runs while FSDP holds the layer's gathered weights). Compile goes
    inside the checkpoint: dynamo does not trace into ``torch.utils.checkpoint``, so a compiled
    layer around it would compile nothing.

    Args:
        model: a ``TransformerDecoder`` (``model.layers``).
        activation_checkpointing: recompute each layer's activations in backward
            (non-reentrant, so dropout RNG and keyword arguments are handled).
        compile_layers: compile each layer's forward.
    """
    for layer in model.layers:
        forward = layer.forward
        if compile_layers:
            forward = torch.compile(forward)
        if activation_checkpointing:
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        layer.forward = forward
    return model
