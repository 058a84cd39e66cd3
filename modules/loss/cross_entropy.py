"""The causal-LM loss: token cross-entropies of the output head, summed."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tunelab.kernels.fused_ce import loss_sum as fused_loss_sum

IGNORE_INDEX = -100  # label of positions that are not trained on


def cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    output_weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Sum (not mean) of the token cross-entropies of one batch, in fp32.

    With a plain output head (``output_weight`` given) the fused, chunked kernel of
    :mod:`tunelab.kernels.fused_ce` never materialises the [b, s, vocab] fp32 logits on CUDA
    (same numbers as the full-logits reference, which runs on CPU); otherwise (a LoRA'd head)
    ``lm_head`` gives the logits.

    Args:
        hidden: [b, s, dim] final-normed hidden states (``model(tokens, return_hidden=True)``).
        labels: [b, s] pre-shifted targets, ``ignore_index`` where not trained on.
        lm_head: hidden -> logits, e.g. ``model.logits_from_hidden``.
        output_weight: the frozen [vocab, dim] head when the output layer is a plain linear.
        ignore_index: label value of untrained positions.

    Returns:
        fp32 0-dim tensor. Divide by the label tokens of the whole optimizer step for the mean.
    """
    if output_weight is not None:
        return fused_loss_sum(hidden, output_weight, labels, ignore_index=ignore_index)
    logits = lm_head(hidden)  # (b, s, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index,
                           reduction="sum")
