"""Pieces of the training step that every LoRA recipe shares (one copy, not one per recipe)."""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from tunelab.data.collate import packed_collate, padded_collate
from tunelab.errors import ConfigError, TunelabError
from tunelab.modules.feed_forward import FeedForward
from tunelab.modules.loss import IGNORE_INDEX, cross_entropy_sum
from tunelab.modules.recompute import keeping, recomputing
from tunelab.training.offload import ActivationOffloader
from tunelab.training.process_group import all_reduce_sum

__all__ = ["IGNORE_INDEX", "NonFiniteLossError", "RouterAuxLoss", "wrap_layers", "checkpoint_every", "make_loader",
           "loss_sum",
           "plain_output_weight", "evaluate_loss", "micro_batch_backward", "optimizer_steps", "clip_grad_norm",
           "optimizer_step"]


def wrap_layers(model: nn.Module, *, activation_checkpointing: bool | int, compile_layers: bool,
                offload_activations: bool | str = False, offload_host_gib: float | None = None,
                mlp_tile_tokens: int | None = None) -> nn.Module:
    """Activation checkpointing, ``torch.compile`` and the sequence-tiled MLP per decoder layer,
    in place.

    Swapping each layer's ``forward`` (not wrapping the module) keeps parameter names, so
    checkpoints do not change, and leaves FSDP2's module hooks outside the checkpoint (the
    recompute in backward runs while FSDP holds the layer's gathered weights). Compile goes
    inside the checkpoint: dynamo does not trace into ``torch.utils.checkpoint``, so a compiled
    layer around it would compile nothing.

    Args:
        model: a ``TransformerDecoder`` (``model.layers``).
        activation_checkpointing: recompute layers' activations in backward (non-reentrant, so
            dropout RNG and keyword arguments are handled): True every layer, an integer k >= 1
            every k-th layer (layers 0, k, 2k, ...: selective checkpointing, between the two
            in memory and speed), False / 0 none. The rerun is marked
            (``modules.recompute``) so that it skips the MLP's down-projection GEMM, whose
            output only the discarded rerun would read.
        compile_layers: compile each layer's forward.
        offload_activations: keep the checkpointed layer inputs in pinned CPU memory between
            forward and backward (:class:`~tunelab.training.offload.ActivationOffloader`), and
            attention's saved tensors too, so the rerun skips the q/k/v projections and the
            attention kernel (``modules.recompute.kept``); needs ``activation_checkpointing``.
            ``"inputs"``: the layer inputs only, attention recomputed (long context, where q/k/v
            would not fit in host memory).
        offload_host_gib: cap on the pinned host copies of one forward; the layers past it
            keep their inputs on the device (None: no cap).
        mlp_tile_tokens: run each dense layer's MLP block (norm, MLP, residual add) this many
            tokens at a time in forward and backward (``modules.tiling``), None: whole. Under
            compile the block is compiled on its own (the tiled region is a graph break).

    Raises:
        ConfigError: a negative ``activation_checkpointing``, ``offload_activations``
            without checkpointing, or ``mlp_tile_tokens`` < 1.
    """
    every = checkpoint_every(activation_checkpointing, offload_activations)
    check_mlp_tile_tokens(mlp_tile_tokens)
    offloader = None
    if offload_activations:
        cap = None if offload_host_gib is None else int(offload_host_gib * 2**30)
        offloader = ActivationOffloader(keep_regions=offload_activations != "inputs", max_host_bytes=cap)
    for i, layer in enumerate(model.layers):
        if mlp_tile_tokens is not None and isinstance(layer.mlp, FeedForward):
            layer.mlp_tile = mlp_tile_tokens
            if compile_layers:
                layer.mlp_block = torch.compile(layer.mlp_block)
        forward = layer.forward
        if compile_layers:
            forward = torch.compile(forward)
        if every and i % every == 0:
            contexts = (functools.partial(_keep_contexts, offloader) if offloader is not None and offloader.keep_regions
                        else _recompute_contexts)
            forward = functools.partial(checkpoint, forward, use_reentrant=False, context_fn=contexts)
            if offloader is not None:
                forward = functools.partial(_with_hooks, offloader, forward)
        layer.forward = forward
    return model


def checkpoint_every(activation_checkpointing: bool | int, offload_activations: bool | str = False) -> int:
    """The ``activation_checkpointing`` setting as "checkpoint every k-th layer" (0: none),
    checked together with ``offload_activations`` (which offloads checkpointed layers' inputs).

    Raises:
        ConfigError: a negative integer, or offloading without checkpointing.
    """
    every = int(activation_checkpointing)
    if every < 0:
        raise ConfigError(f"activation_checkpointing: {activation_checkpointing} is negative; use true (every "
                          "layer), false, or an integer k >= 1 (every k-th layer)")
    if offload_activations and not every:
        raise ConfigError(f"offload_activations: {str(offload_activations).lower()} needs activation_checkpointing: "
                          "true (it offloads the checkpointed layer inputs); enable it or set offload_activations: "
                          "false")
    return every


def check_mlp_tile_tokens(mlp_tile_tokens: int | None) -> None:
    """Raises ConfigError unless ``mlp_tile_tokens`` is None or >= 1."""
    if mlp_tile_tokens is not None and mlp_tile_tokens < 1:
        raise ConfigError(f"mlp_tile_tokens: {mlp_tile_tokens} must be >= 1 (tokens per MLP tile, e.g. 8192) "
                          "or null (MLP not tiled)")


def _recompute_contexts():
    # (forward, recompute): modules skip work whose result only the thrown-away rerun would read
    return contextlib.nullcontext(), recomputing()


def _keep_contexts(offloader: ActivationOffloader):
    # as above, and the call's kept regions (attention) go to the offloader and are replayed
    keeper = offloader.keeper()
    return keeping(keeper), recomputing(keeper)


def _with_hooks(offloader: ActivationOffloader, forward, *args, **kwargs):
    with offloader.hooks():
        return forward(*args, **kwargs)


class NonFiniteLossError(TunelabError):
    """The loss or gradient norm became nan/inf; training stopped before the optimizer step."""


def make_loader(dataset, batch_size: int, sampler, pad_id: int, packed: bool, pad_to: int | None = None) -> DataLoader:
    """Batches of ``batch_size`` samples (incomplete last batch dropped), padded to the longest
    sample or to ``pad_to`` (fixed shapes for ``cuda_graph``), or packed rows as they are."""

    def collate(samples):
        batch = packed_collate(samples) if packed else padded_collate(samples, pad_id, pad_to=pad_to)
        if "num_tokens" not in batch:  # real tokens, for tok/s (packed rows count their own)
            batch["num_tokens"] = sum(len(s["tokens"]) for s in samples)
        return batch

    # a private generator: iter(DataLoader) otherwise draws a seed from the global RNG, which
    # would shift the dropout masks of a resumed run
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def plain_output_weight(model) -> torch.Tensor | None:
    """``model.output_weight`` when the output head is a plain linear (a fused loss may multiply
    by it), None where the head's module must be called (LoRA on ``output``)."""
    try:
        return model.output_weight
    except ConfigError:
        return None


def loss_sum(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Sum (not mean) of the token cross-entropies of one micro-batch, in fp32
    (``tunelab.modules.loss.cross_entropy_sum``: fused and chunked on CUDA with a plain head)."""
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    extra = {k: batch[k].to(device) for k in ("position_ids", "document_ids") if k in batch}
    hidden = model(tokens, return_hidden=True, **extra)  # (b, s, dim)
    return cross_entropy_sum(hidden, labels, model.logits_from_hidden, output_weight=plain_output_weight(model))


@torch.no_grad()
def evaluate_loss(model, loader: DataLoader, device: torch.device) -> float:
    """Mean token loss over the whole loader, over every rank's batches (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        total += loss_sum(model, batch, device).item()
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train()
    total, count = all_reduce_sum([total, count], device)
    return total / max(count, 1)


class RouterAuxLoss:
    """The load-balancing loss of a mixture-of-experts model in training (Switch Transformer's,
    as transformers adds it with ``output_router_logits=True``: ``router_aux_loss_coef`` x
    :func:`~tunelab.modules.moe.load_balancing_loss` over every MoE block's router logits of the
    forward). Falsy for a dense model or when switched off.

    Args:
        model: the (possibly wrapped) model.
        enabled: the recipe's ``router_aux_loss`` switch.
    """

    def __init__(self, model, enabled: bool) -> None:
        from tunelab.modules.moe import BiasedMoE, MoE

        args = model.args
        self.blocks = [m for m in model.modules() if isinstance(m, (MoE, BiasedMoE))] if enabled else []
        self.coef, self.n_experts, self.top_k = args.router_aux_loss_coef, args.n_experts, args.experts_per_token
        self._values: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.blocks) and self.coef > 0

    def loss(self) -> torch.Tensor:
        """``coef`` x the load-balancing loss of the forward just run (the loss kept for
        :meth:`metrics`). The caller weighs it by its micro-batch's share of the step (label
        tokens for SFT, pairs for DPO), as it weighs the main loss."""
        from tunelab.modules.moe import load_balancing_loss

        aux = load_balancing_loss([b.router_logits for b in self.blocks], self.n_experts, self.top_k)
        self._values.append(aux.detach())
        return self.coef * aux

    def metrics(self) -> dict:
        """``{"router_aux_loss": mean since the last call}`` (this rank's micro-batches; empty
        for a dense model)."""
        if not self._values:
            return {}
        value = torch.stack(self._values).mean().item()
        self._values.clear()
        return {"router_aux_loss": value}


def micro_batch_backward(model, params: list, device: torch.device, *, cuda_graph: bool = False,
                         router_aux: RouterAuxLoss | None = None, check_loss: bool = False):
    """``(batch, n_labels) -> summed loss`` (detached): the forward and backward of one
    micro-batch, accumulating the gradients of ``loss_sum / n_labels`` (``n_labels`` = label
    tokens of the whole optimizer step) plus, for an MoE model, ``router_aux``'s loss weighted by
    the micro-batch's share of those labels. With ``cuda_graph`` it is captured once and replayed
    (:class:`~tunelab.training.cuda_graph.MicroBatchGraph`; clear gradients in place then).
    ``check_loss``: a non-finite loss raises ``NonFiniteLossError`` before backward (one sync;
    for an optimizer stepping inside backward, which would otherwise apply it)."""

    def eager(batch: dict, n_labels: int) -> torch.Tensor:
        loss = loss_sum(model, batch, device)
        if check_loss and not torch.isfinite(loss):
            raise NonFiniteLossError(f"the loss is {loss.item()}; stopped before backward, nothing of this step "
                                     "was applied or saved; lower optimizer.lr or use dtype=fp32")
        total = loss  # MoE: plus the load-balancing loss, weighted by the micro-batch's labels
        if router_aux:
            total = loss + router_aux.loss() * int((batch["labels"] != IGNORE_INDEX).sum())
        (total / n_labels).backward()
        return loss.detach()

    if not cuda_graph:
        return eager
    from tunelab.training.cuda_graph import MicroBatchGraph

    return MicroBatchGraph(lambda batch: loss_sum(model, batch, device), params, device, fallback=eager)


def optimizer_steps(progress, loader, sampler, *, accum: int, samples_per_batch: int, steps_per_epoch: int,
                    total_steps: int):
    """Yield the ``accum`` micro-batches of each optimizer step, from the saved data position on.

    The recipe advances ``progress.step`` and ``progress.batches_consumed`` (by ``accum``) after
    each step; this generator reads them, so a resumed run continues at exactly the batch an
    uninterrupted one would have reached, and a new epoch starts when one is used up.

    Args:
        progress: the ``TrainingProgress`` (epoch, batches_consumed, step).
        loader: DataLoader over ``sampler``.
        sampler: a ``ResumableSampler`` (``set_epoch(epoch, start_sample=...)``).
        accum: micro-batches per optimizer step.
        samples_per_batch: samples the sampler hands out per micro-batch (batch_size, times the
            world size for a distributed sampler).
        steps_per_epoch: optimizer steps in one epoch.
        total_steps: stop after this many optimizer steps.
    """
    while progress.step < total_steps:
        if progress.batches_consumed // accum >= steps_per_epoch:  # epoch finished
            progress.epoch, progress.batches_consumed = progress.epoch + 1, 0
        sampler.set_epoch(progress.epoch, start_sample=progress.batches_consumed * samples_per_batch)
        batches = iter(loader)
        while progress.step < total_steps and progress.batches_consumed // accum < steps_per_epoch:
            yield [next(batches) for _ in range(accum)]


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Clip the gradients to ``max_norm`` (None: only measure); returns the norm before
    clipping. FSDP-sharded gradients give the norm over all ranks' shards, the number one
    device would log."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def optimizer_step(optimizer, scheduler, *, step: int, loss: float, grad_norm: float, last_saved: Path | None,
                   knobs: str = "optimizer.lr", grads_in_place: bool = False) -> float:
    """Check the step is finite, then step the optimizer and the lr schedule and clear the
    gradients. The training position is the caller's to advance (the loop shows it).

    Args:
        optimizer, scheduler: what to step.
        step: the number of this optimizer step (1-based), for the error.
        loss, grad_norm: the step's loss and (pre-clipping) gradient norm.
        last_saved: the newest checkpoint folder, named in the error.
        knobs: the settings the error suggests lowering.
        grads_in_place: zero the gradients instead of dropping them (a CUDA graph writes
            into the same buffers every step).

    Returns:
        The lr this step used (the scheduler has moved on to the next one).

    Raises:
        NonFiniteLossError: loss or gradient norm is nan/inf; nothing was stepped or saved.
    """
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
        raise NonFiniteLossError(
            f"loss {loss} / grad norm {grad_norm} at step {step} is not finite; "
            f"stopped without saving ({kept}); lower {knobs}, set max_grad_norm or use dtype=fp32")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=not grads_in_place)
    return lr
