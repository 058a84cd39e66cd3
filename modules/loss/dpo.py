"""Preference-optimisation losses (DPO, IPO, hinge, SimPO, ORPO) and per-sequence log-probabilities.

Every loss takes per-sequence log-probabilities ``log pi(y | x)`` summed over the response
tokens (from :func:`sequence_log_probs`), shape [b] each, and returns
``(losses, chosen_rewards, rejected_rewards)``, all [b]: ``losses`` per pair (the caller
reduces them, so gradient accumulation can weight pairs exactly) and the rewards detached, for
logging. With ``z = pi_logratio - ref_logratio`` where ``pi_logratio = log pi(y_w) - log pi(y_l)``
and ``ref_logratio`` the same under the reference model:

* ``sigmoid`` (DPO, Rafailov et al. 2023, with the conservative-DPO label smoothing eps):
  ``-(1 - eps) log sigma(beta z) - eps log sigma(-beta z)``. With ``eps = 0`` this is TRL's
  ``DPOTrainer`` ``loss_type="sigmoid"``; with ``eps > 0`` it is the form TRL's sigmoid loss had
  before 1.0 (and its ``aot`` loss for one pair, and ``CPOTrainer``'s sigmoid).
* ``ipo`` (Azar et al. 2023, eq. 17): ``(z' - 1 / (2 beta))^2`` where ``z'`` uses log-ratios
  averaged per response token, as TRL's ``DPOTrainer`` does (a choice the IPO authors confirmed
  to TRL: it keeps ``beta`` comparable across response lengths).
* ``hinge`` (SLiC / RSO, Zhao et al. 2023; Liu et al. 2023): ``relu(1 - beta z)``.
* ``simpo`` (Meng et al. 2024, reference-free): with length-normalised log-probs
  ``a_w = log pi(y_w) / |y_w|``, ``a_l = log pi(y_l) / |y_l|``:
  ``-(1 - eps) log sigma(beta (a_w - a_l) - gamma) - eps log sigma(-(beta (a_w - a_l) - gamma))``;
  ``gamma`` is the target reward margin (TRL's ``CPOConfig.simpo_gamma``).

* ``orpo`` (Hong et al. 2024, reference-free; TRL's ``ORPOTrainer``): with length-averaged
  response log-probs ``a_w``, ``a_l``, the log odds ratio
  ``o = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))`` and the SFT term on the chosen rows:
  ``NLL(chosen) - beta log sigma(o)``. As in TRL the NLL is the token mean of the chosen rows'
  cross-entropy over prompt AND response (every token after the first) of the micro-batch; per
  pair it is written as that row's summed NLL times ``b / tokens``, so the pairs' mean is TRL's
  batch loss. Rewards ``beta * a`` (TRL's).

* ``kto`` (Ethayarajh et al. 2024; TRL's ``KTOTrainer``, ``loss_type="kto"``) on UNPAIRED rows,
  each desirable or not: with ``r = log pi(y) - log pi_ref(y)`` (summed) and the KL estimate
  ``z`` (see :func:`kto_loss`), ``w_d (1 - sigma(beta (r - z)))`` for a desirable row and
  ``w_u (1 - sigma(beta (z - r)))`` for an undesirable one; rewards ``beta * r``.

Rewards: ``beta * (log pi(y) - log pi_ref(y))`` for the reference-based losses (TRL's
``rewards/chosen`` / ``rewards/rejected``; summed, not averaged, also for IPO as in TRL), and
``beta * log pi(y) / |y|`` for SimPO (TRL's CPO trainer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.kernels import use_triton
from tunelab.kernels.fused_ce import fused_linear_cross_entropy
from tunelab.modules.loss.cross_entropy import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")  # paired; kto (unpaired rows) has its own call
REFERENCE_FREE = ("simpo", "orpo")

Rewards = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------ log-probs
def sequence_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    Args:
        logits: [b, s, vocab] model outputs (any float dtype; the log-softmax runs in fp32).
        labels: [b, s] PRE-SHIFTED targets (``labels[i]`` is the token after position ``i``),
            ``ignore_index`` where nothing is scored (prompt, padding).
        ignore_index: label value of unscored positions.

    Returns:
        ``(log_probs, num_tokens)``: fp32 [b] sums of ``log p(labels[i] | tokens[:i+1])`` and
        int64 [b] counts of scored positions.
    """
    mask = labels != ignore_index  # [b, s]
    safe = labels.masked_fill(~mask, 0)
    token_lp = -F.cross_entropy(logits.flatten(0, 1).float(), safe.flatten(), reduction="none")  # [b*s]
    token_lp = token_lp.view(labels.shape) * mask
    return token_lp.sum(-1), mask.sum(-1)


def sequence_log_probs_from_hidden(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    output_weight: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_log_probs` from final hidden states, without materialising all logits.

    Only the labelled positions go through the output head (for DPO that skips the prompt
    half), ``chunk_size`` positions at a time; with autograd on, each chunk is checkpointed so
    only one chunk's [chunk, vocab] logits live at once (recomputed in backward). For a 128k
    vocab and the default 1024 positions: 0.25 GiB of bf16 logits + 0.5 GiB of fp32 copy,
    instead of [b, s, vocab] logits for the whole micro-batch. Where the fused Triton loss runs
    (CUDA) and ``output_weight`` is given, the fused per-token cross-entropy of
    :mod:`tunelab.kernels.fused_ce` replaces the checkpointed chunks: one bf16 logits chunk, no
    fp32 copies and no recomputation in backward.

    Args:
        hidden: [b, s, dim] final-normed hidden states (``model(tokens, return_hidden=True)``).
        labels: [b, s] pre-shifted targets, ``ignore_index`` where unscored.
        lm_head: hidden [n, dim] -> logits [n, vocab], e.g. ``model.logits_from_hidden`` (so a
            LoRA adapter on the output layer applies).
        output_weight: the frozen [vocab, dim] head when the output layer is a plain linear
            (``model.output_weight``); None where ``lm_head`` must be called.
        chunk_size: positions per output-head call (checkpointed path).
        ignore_index: label value of unscored positions.

    Returns:
        ``(log_probs, num_tokens)`` as in :func:`sequence_log_probs`.
    """
    mask, token_lp = _scored_log_probs(hidden, labels, lm_head, output_weight, chunk_size, ignore_index)
    rows = mask.nonzero()[:, 0]  # [n]: which sequence each scored position belongs to
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_lp)
    return sums, mask.sum(-1)


def token_log_probs_from_hidden(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    output_weight: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-position log-probabilities of the labelled tokens, [b, s] fp32 (0 where unscored):
    what :func:`sequence_log_probs_from_hidden` sums, kept per token (GRPO's ratios are per
    token). Arguments as there."""
    mask, token_lp = _scored_log_probs(hidden, labels, lm_head, output_weight, chunk_size, ignore_index)
    return torch.zeros(labels.shape, dtype=torch.float32, device=labels.device).masked_scatter(mask, token_lp)


def _scored_log_probs(hidden, labels, lm_head, output_weight, chunk_size: int, ignore_index: int):
    """``(mask [b, s], log-probs [n] of the n labelled positions in row-major order)``."""
    mask = labels != ignore_index  # [b, s]
    h = hidden[mask]  # [n, dim]
    targets = labels[mask]  # [n]
    if output_weight is not None and not output_weight.requires_grad and use_triton(h):
        token_lp = -fused_linear_cross_entropy(h, output_weight, targets, ignore_index=ignore_index, reduction="none")
    else:
        token_lp = _chunked_token_log_probs(h, targets, lm_head, chunk_size)
    return mask, token_lp


def whole_sequence_labels(tokens: torch.Tensor, lengths: torch.Tensor, *,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pre-shifted labels scoring every token of each row after the first (prompt included).

    Args:
        tokens: [b, s] right-padded rows.
        lengths: [b] each row's length before the padding.
        ignore_index: label value of unscored positions.

    Returns:
        [b, s]: ``tokens[:, i + 1]`` at positions ``i < length - 1``, ``ignore_index`` elsewhere.
    """
    shifted = torch.cat([tokens[:, 1:], tokens.new_full((tokens.shape[0], 1), ignore_index)], dim=1)
    position = torch.arange(tokens.shape[1], device=tokens.device)
    return shifted.masked_fill(position[None] >= lengths[:, None] - 1, ignore_index)


def _chunked_token_log_probs(h: torch.Tensor, targets: torch.Tensor, lm_head, chunk_size: int) -> torch.Tensor:
    """[n] fp32 log-probs of ``targets`` under ``lm_head(h)``, one checkpointed chunk at a time."""
    use_checkpoint = torch.is_grad_enabled() and h.requires_grad

    def chunk_lp(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(lm_head(h_chunk).float(), y_chunk, reduction="none")  # [n_chunk]

    parts = []
    for start in range(0, h.shape[0], chunk_size):
        h_c, y_c = h[start : start + chunk_size], targets[start : start + chunk_size]
        parts.append(checkpoint(chunk_lp, h_c, y_c, use_reentrant=False) if use_checkpoint else chunk_lp(h_c, y_c))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


# ------------------------------------------------------------------------------ losses
def _logratio_rewards(beta: float, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """(chosen, rejected) rewards ``beta * (log pi - log pi_ref)``, detached: for logging only."""
    return beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def _smoothed_logsigmoid(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # conservative DPO: with probability eps the preference label is flipped
    return -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Rewards:
    """DPO sigmoid loss ``-(1-eps) log sigma(beta z) - eps log sigma(-beta z)`` (module docstring).

    Args:
        policy_chosen, policy_rejected: [b] summed response log-probs under the policy.
        ref_chosen, ref_rejected: [b] the same under the reference model.
        beta: inverse temperature (strength of the KL penalty towards the reference).
        label_smoothing: eps in [0, 0.5), the assumed probability of a flipped label.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each [b].
    """
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = _smoothed_logsigmoid(beta * z, label_smoothing)
    return losses, *_logratio_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
) -> Rewards:
    """IPO loss ``(z' - 1/(2 beta))^2`` with per-token-averaged log-ratios (module docstring).

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: [b] summed log-probs.
        chosen_lengths, rejected_lengths: [b] response token counts (clamped to >= 1).
        beta: the regulariser tau of the IPO paper.
    """
    chosen_avg = (policy_chosen - ref_chosen) / chosen_lengths.clamp(min=1)
    rejected_avg = (policy_rejected - ref_rejected) / rejected_lengths.clamp(min=1)
    losses = (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2
    return losses, *_logratio_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected)


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> Rewards:
    """Hinge (SLiC / RSO) loss ``relu(1 - beta z)``; arguments as in :func:`dpo_loss`."""
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = torch.relu(1.0 - beta * z)
    return losses, *_logratio_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected)


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Rewards:
    """SimPO: reference-free, length-normalised, with target margin ``gamma`` (module docstring).

    Args:
        policy_chosen, policy_rejected: [b] summed response log-probs under the policy.
        chosen_lengths, rejected_lengths: [b] response token counts (clamped to >= 1).
        beta: reward scale.
        gamma: target reward margin (TRL ``simpo_gamma``; the paper's gamma).
        label_smoothing: eps in [0, 0.5).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)`` with rewards ``beta * log pi(y) / |y|``.
    """
    chosen_avg = policy_chosen / chosen_lengths.clamp(min=1)
    rejected_avg = policy_rejected / rejected_lengths.clamp(min=1)
    losses = _smoothed_logsigmoid(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable on both sides of -ln 2 (Maechler's two branches)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_sequence_log_probs: torch.Tensor,
    chosen_sequence_tokens: torch.Tensor,
    *,
    beta: float,
) -> Rewards:
    """ORPO: SFT on the chosen rows plus the odds-ratio term (module docstring).

    Args:
        policy_chosen, policy_rejected: [b] summed response log-probs.
        chosen_lengths, rejected_lengths: [b] response token counts (clamped to >= 1).
        chosen_sequence_log_probs: [b] summed log-probs of the chosen rows' whole sequences
            (prompt and response, every token after the first).
        chosen_sequence_tokens: [b] how many tokens those sums cover.
        beta: weight of the odds-ratio term (TRL's ``beta``, the paper's lambda).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each [b]; ``losses.mean()`` is TRL's
        ORPO loss of the micro-batch.
    """
    chosen_avg = policy_chosen.float() / chosen_lengths.clamp(min=1)
    rejected_avg = policy_rejected.float() / rejected_lengths.clamp(min=1)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    nll = -chosen_sequence_log_probs * (len(chosen_sequence_log_probs) / chosen_sequence_tokens.sum().clamp(min=1))
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    kl: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Rewards:
    """KTO's loss per row (module docstring).

    Args:
        policy, reference: [b] summed completion log-probs under the policy and the reference.
        kl: the KL estimate, a scalar: the mean over mismatched (prompt, completion) rows of
            ``log pi - log pi_ref`` (TRL: of the micro-batch, averaged over the ranks); it is
            detached and clamped at 0 here, as TRL does.
        desirable: bool [b], True for the desirable rows.
        beta: the inverse temperature.
        desirable_weight, undesirable_weight: TRL's ``desirable_weight`` / ``undesirable_weight``.

    Returns:
        ``(losses [b], desirable rows' rewards, undesirable rows' rewards)``; ``losses.mean()``
        is TRL's loss of the micro-batch.
    """
    z = kl.detach().clamp(min=0)
    ratio = policy - reference
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))))
    rewards = beta * ratio.detach()
    return losses, rewards[desirable], rewards[~desirable]


def preference_loss(
    loss_type: str,
    policy_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    num_tokens: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_sequences: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Rewards:
    """Dispatch on ``loss_type`` for a batch laid out as ``[chosen rows; rejected rows]``.

    Args:
        loss_type: one of ``LOSS_TYPES``.
        policy_log_probs: [2b] summed response log-probs, the b chosen rows first.
        ref_log_probs: [2b] the same under the reference (None for ``simpo``).
        num_tokens: [2b] response token counts.
        beta, label_smoothing, gamma: see the individual losses (``label_smoothing`` for
            sigmoid and simpo, ``gamma`` for simpo).
        chosen_sequences: orpo only: ([b] summed log-probs of the chosen rows' whole
            sequences, [b] their token counts).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each [b].
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    pc, pr = policy_log_probs.chunk(2)
    nc, nr = num_tokens.chunk(2)
    if loss_type == "simpo":
        return simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    if loss_type == "orpo":
        if chosen_sequences is None:
            raise ValueError("the orpo loss needs the chosen rows' whole-sequence log-probs (chosen_sequences)")
        return orpo_loss(pc, pr, nc, nr, *chosen_sequences, beta=beta)
    if ref_log_probs is None:
        raise ValueError(f"the {loss_type} loss needs reference log-probs")
    rc, rr = ref_log_probs.chunk(2)
    if loss_type == "sigmoid":
        return dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(pc, pr, rc, rr, nc, nr, beta=beta)
    return hinge_loss(pc, pr, rc, rr, beta=beta)
