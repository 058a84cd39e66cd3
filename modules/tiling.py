"""Sequence tiling: run a per-token block a tile of tokens at a time, in forward and backward.

The MLP of a decoder layer (its norm, the gate/up/down projections and the residual add) treats
every token on its own, and its intermediates are the widest tensors of the layer: Llama-3.1-8B's
MLP holds 3 x 14,336 values per token (gate, up, their product), ~84 KiB a token in bf16, 42 GiB
at 512k tokens, while its input and output are 4,096 wide. :func:`tiled` computes such a block
over ``tile`` tokens at a time: the forward keeps only the input (the block's intermediates
exist for one tile), and the backward runs each tile's forward again with autograd and
backpropagates it before the next, accumulating the parameters' gradients over the tiles. Peak
memory of the block drops from O(tokens x hidden) to O(tile x hidden); the price is one more
forward of the block per step (the same price activation checkpointing pays, and under
checkpointing the recompute skips the block instead, so the total is unchanged).

The result equals the untiled block up to the order of the sums over tokens in the weight
gradients (one GEMM over all tokens versus a sum of per-tile GEMMs): fp32 rounding, ~1e-6
relative. Random ops inside the block (LoRA dropout) see the same draws in backward as in
forward: the RNG state is captured at the forward and restored around the backward's rerun.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["tiled"]


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, params: list[torch.Tensor], *,
          unread: bool = False) -> torch.Tensor:
    """``fn(x)`` for a per-token ``fn``, computed ``tile`` tokens at a time.

    Args:
        fn: the block, [n, d] -> [n, d_out], each output row a function of its input row only
            (and of parameters). It may draw random numbers (dropout).
        x: the input [..., d]; every leading dimension is a token dimension.
        tile: tokens per tile (>= 1). Inputs of at most ``tile`` tokens run ``fn`` directly.
        params: the tensors ``fn`` uses that may need gradients (the block's parameters; the
            ones not requiring grad are ignored).
        unread: the caller will not read the result (activation checkpointing's rerun, whose
            outputs are thrown away): the block is not computed, only the saved input kept
            for the backward.

    Returns:
        [..., d_out], with gradients for ``x`` and ``params`` through the tiled backward.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, d)
    if flat.shape[0] <= tile:
        return fn(x)
    wanted = [p for p in params if p.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or wanted):
        return _forward_tiles(fn, flat, tile).view(*lead, -1)
    global _apply_eagerly
    if _apply_eagerly is None:  # lazily: torch.compiler.disable imports torch._dynamo (~1 s)
        _apply_eagerly = torch.compiler.disable(_Tiled.apply)
    out = _apply_eagerly(fn, tile, unread, flat, *wanted)
    return out.view(*lead, out.shape[-1])


# _Tiled.apply behind torch.compiler.disable: inside a compiled layer the tiled block is a graph
# break (dynamo cannot trace a backward that runs autograd itself); the block's own function
# may be compiled on its own (``training.steps.wrap_layers`` does so when compiling).
_apply_eagerly: Callable | None = None


def _forward_tiles(fn: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor, tile: int) -> torch.Tensor:
    out = None
    for start, chunk in zip(range(0, flat.shape[0], tile), flat.split(tile)):
        y = fn(chunk)
        if out is None:  # the first tile says the output's width and dtype
            out = y.new_empty(flat.shape[0], y.shape[-1])
        out[start:start + y.shape[0]] = y
    return out


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile: int, unread: bool, flat: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.tile = fn, tile
        ctx.rng = _rng_state(flat.device)
        ctx.save_for_backward(flat, *params)
        if unread:  # a checkpoint rerun only refills saved tensors; the first tile gives the shape
            with _restoring_rng(flat.device, ctx.rng):
                y = fn(flat[:1])
            return y.new_empty(flat.shape[0], y.shape[-1])
        return _forward_tiles(fn, flat, tile)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[3]
        grad_x = torch.empty_like(flat) if need_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        with _restoring_rng(flat.device, ctx.rng):  # the same dropout draws as the forward, in order
            for start, chunk, g in zip(range(0, flat.shape[0], ctx.tile), flat.split(ctx.tile), grad.split(ctx.tile)):
                chunk = chunk.detach().requires_grad_(need_x)
                with torch.enable_grad():
                    y = ctx.fn(chunk)
                inputs = ([chunk] if need_x else []) + params
                grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
                if need_x:
                    grad_x[start:start + chunk.shape[0]] = grads[0]
                    grads = grads[1:]
                for i, part in enumerate(grads):
                    if part is not None:
                        grad_params[i] = part if grad_params[i] is None else grad_params[i].add_(part)
        return None, None, None, grad_x, *grad_params


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _restoring_rng(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]):
    """Run the block from the RNG state ``state``; the caller's RNG is left as it was."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type=device.type):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
