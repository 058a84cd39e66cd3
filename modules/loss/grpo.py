"""GRPO (group relative policy optimisation) as TRL's ``GRPOTrainer`` defines it: group-normalised
advantages, the clipped importance-ratio loss per completion token, an optional KL penalty to a
reference, and the aggregation variants under TRL's names.

For prompts with G sampled completions each (``num_generations``, rows grouped prompt by
prompt), rewards r [B] (B = prompts x G) give advantages

    A = (r - mean_group(r)) / (std(r) + 1e-4)

with ``std`` over the group (``scale_rewards="group"``, TRL's default), over the whole batch
(``"batch"``), or no division at all (``"none"``); std is the unbiased (Bessel) estimate. Per
completion token t, with the ratio ``rho = exp(log pi(t) - log pi_old(t))`` (pi_old: the
policy that sampled, = pi at the first optimisation iteration):

    loss_t = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t
    KL_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1        (k3, >= 0)

and the batch loss aggregates the masked per-token losses as TRL's ``loss_type``:

* ``grpo``: each completion's token mean, then the mean over completions;
* ``bnpo``: the token mean over the micro-batch;
* ``dr_grpo``: the token sum divided by (completions x ``max_completion_len``);
* ``dapo``: the token sum divided by the active tokens of the whole accumulated batch (every
  micro-batch and every rank; TRL's default), so each token weighs the same in the step.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["GRPO_LOSS_TYPES", "clip_fractions", "group_advantages", "grpo_loss", "grpo_per_token_loss"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _unbiased_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return x.std(dim=dim, correction=1) if dim is not None else x.std(correction=1)


def group_advantages(rewards: torch.Tensor, num_generations: int,
                     scale_rewards: Literal["group", "batch", "none"] = "group") -> torch.Tensor:
    """Group-relative advantages (module docstring).

    Args:
        rewards: [B] fp32, the G completions of each prompt consecutive (B = prompts x G).
        num_generations: G (>= 2: one completion has nothing to be relative to).
        scale_rewards: divide by the group's std, the batch's, or not at all.

    Returns:
        [B] advantages.
    """
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 for group-relative advantages, got {num_generations}")
    grouped = rewards.view(-1, num_generations)  # [prompts, G]
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = _unbiased_std(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = _unbiased_std(rewards).expand_as(rewards)
    elif scale_rewards == "none":
        return advantages
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return advantages / (std + 1e-4)


def grpo_per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The clipped surrogate loss per completion token, plus ``beta`` x the k3 KL to the reference.

    Args:
        logps: [B, T] log-probs of the sampled tokens under the policy being trained (with grad).
        old_logps: [B, T] the same under the policy that sampled (no grad).
        advantages: [B] per completion.
        epsilon: the lower clip ``1 - epsilon`` (and the upper one unless ``epsilon_high``).
        epsilon_high: the upper clip ``1 + epsilon_high`` (DAPO's clip-higher); None = ``epsilon``.
        ref_logps: [B, T] under the reference (needed when ``beta`` > 0).
        beta: the KL coefficient.

    Returns:
        ``(per_token_loss [B, T], ratio [B, T] (detached), per_token_kl [B, T] or None)``.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)  # [B, 1]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        loss = loss + beta * kl
    return loss, ratio.detach(), kl


def grpo_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
              max_completion_len: int | None = None, num_active_tokens: float | None = None) -> torch.Tensor:
    """Aggregate one micro-batch's per-token losses as ``loss_type`` (module docstring).

    Args:
        per_token_loss: [B, T].
        mask: [B, T] 1 on completion tokens (up to and including the stop token), 0 on padding.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        max_completion_len: ``dr_grpo``'s constant length.
        num_active_tokens: ``dapo``'s normaliser: active tokens of the whole accumulated batch
            (all micro-batches, all ranks).

    Returns:
        The scalar loss of the micro-batch (``grpo``/``bnpo``/``dr_grpo``: a mean over it,
        to be divided by the number of micro-batches when accumulating; ``dapo``: already its
        share of the step).
    """
    mask = mask.to(per_token_loss.dtype)
    total = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_len is None:
            raise ValueError("dr_grpo needs max_completion_len")
        return total / (per_token_loss.shape[0] * max_completion_len)
    if loss_type == "dapo":
        if num_active_tokens is None:
            raise ValueError("dapo needs num_active_tokens (the accumulated batch's completion tokens)")
        return total / max(float(num_active_tokens), 1.0)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; use one of {', '.join(GRPO_LOSS_TYPES)}")


@torch.no_grad()
def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, epsilon: float,
                   epsilon_high: float | None = None) -> torch.Tensor:
    """[3] sums over the active tokens of: clipped low (ratio < 1 - eps where A < 0), clipped
    high (ratio > 1 + eps_high where A > 0), either; divide by the active tokens for TRL's
    ``clip_ratio/low_mean``, ``high_mean``, ``region_mean``."""
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)
    low_clipped = (ratio < 1 - epsilon) & (adv < 0)
    high_clipped = (ratio > 1 + high) & (adv > 0)
    m = mask.bool()
    return torch.stack([(low_clipped & m).sum(), (high_clipped & m).sum(), ((low_clipped | high_clipped) & m).sum()]
                       ).to(torch.float64)
