"""The rollout half of a GRPO step: sample a group of completions per prompt from the policy,
score them, and lay them out for the loss (``tunelab.modules.loss.grpo``).

Why no separate inference engine (vLLM, SGLang): the policy is the LoRA model being trained,
so sampling from it in the same process needs no second copy of the weights and no weight sync
after each optimizer step; the adapters are applied live. Generation goes through the model's
own KV cache, one prompt's group at a time (:func:`tunelab.modules.generation.generate_group`).
Plugging an engine in would mean: export the merged (or base + adapter) weights to it after
each update, let it return token ids (and, for importance-sampling corrections, its
log-probs), and keep this module's layout of the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from tunelab.errors import ConfigError
from tunelab.modules.generation import generate_group
from tunelab.modules.loss import IGNORE_INDEX, token_log_probs_from_hidden
from tunelab.modules.loss.grpo import GRPO_LOSS_TYPES, clip_fractions, group_advantages, grpo_loss, grpo_per_token_loss
from tunelab.modules.peft import disable_adapters
from tunelab.training.process_group import all_gather_stack, all_reduce_sum
from tunelab.training.rewards import RewardSet
from tunelab.training.steps import plain_output_weight

__all__ = ["GRPOFields", "GRPOSettings", "Rollout", "UpdateStats", "check_grpo_settings", "policy_log_probs",
           "reference_log_probs", "roll_out", "rollout_backward", "step_metrics"]


# ------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class GRPOSettings:
    """The ``grpo:`` section (TRL's names)."""

    num_generations: int  # completions per prompt (the group); >= 2
    max_completion_len: int
    temperature: float
    top_k: int | None
    top_p: float | None
    epsilon: float  # ratio clip: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None  # null = epsilon
    beta: float  # KL to the reference (adapters off); 0 = none
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"]
    scale_rewards: Literal["group", "batch", "none"]
    num_iterations: int  # optimizer steps per rollout batch


@dataclass(kw_only=True)
class GRPOFields:
    """The keys the GRPO recipes add to the shared ones: ``grpo`` and the ``rewards`` list
    (``_component_`` nodes, see ``tunelab.training.rewards``)."""

    grpo: GRPOSettings
    rewards: list[dict]


def check_grpo_settings(cfg) -> None:
    """GRPO's value ranges, one line each.

    Raises:
        ConfigError: naming the key and the fix.
    """
    g = cfg.grpo
    if g.num_generations < 2:
        raise ConfigError(f"grpo.num_generations must be >= 2 (a group of {g.num_generations} has nothing to "
                          "compare with)")
    for key, value in (("max_completion_len", g.max_completion_len), ("num_iterations", g.num_iterations)):
        if value < 1:
            raise ConfigError(f"grpo.{key} must be >= 1, got {value}")
    if not (g.epsilon > 0 and (g.epsilon_high is None or g.epsilon_high > 0)):
        raise ConfigError(f"grpo.epsilon and grpo.epsilon_high must be > 0, got {g.epsilon} / {g.epsilon_high}")
    if g.beta < 0 or g.temperature < 0:
        raise ConfigError(f"grpo.beta and grpo.temperature must be >= 0, got {g.beta} / {g.temperature}")
    if cfg.validation is not None:
        raise ConfigError("validation: the GRPO recipe does not score a validation set yet; set validation: null")
    if g.loss_type not in GRPO_LOSS_TYPES:  # the Literal type already refuses it; kept for direct callers
        raise ConfigError(f"grpo.loss_type must be one of {GRPO_LOSS_TYPES}")



# ------------------------------------------------------------------------------ rollouts
@dataclass
class Rollout:
    """One batch of sampled completions, laid out for training (B = prompts x G rows, each
    prompt's G completions consecutive).

    Attributes:
        tokens: [B, s] prompt + completion ids, right-padded.
        labels: [B, s] pre-shifted: the completion's ids at the positions that predict them
            (the stop id included), ``IGNORE_INDEX`` elsewhere; ``labels != IGNORE_INDEX`` is
            the completion mask.
        rewards: [B] weighted total; ``per_reward``: each reward's [B] scores.
        advantages: [B] group-relative.
        completion_lengths: [B] sampled tokens per completion.
        sequence_lengths: [B] prompt + completion tokens per row.
        completions: the decoded completions (for logs).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    rewards: torch.Tensor
    per_reward: dict[str, torch.Tensor]
    advantages: torch.Tensor
    completion_lengths: torch.Tensor
    sequence_lengths: torch.Tensor
    completions: list[str]

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def num_tokens(self) -> int:
        """Prompt and completion tokens of every row (what a tokens/s rate counts)."""
        return int(self.sequence_lengths.sum())


def roll_out(model, items: Sequence[dict], tokenizer, rewards: RewardSet, *, num_generations: int,
             max_completion_len: int, temperature: float, top_k: int | None, top_p: float | None,
             scale_rewards: str, generator: torch.Generator | None, all_finished=None) -> Rollout:
    """Sample ``num_generations`` completions for each prompt item, score and lay them out.

    Args:
        model: the policy (LoRA adapters live).
        items: ``tunelab.data.prompt_dataset`` items (``prompt_ids``, ``prompt``, ``fields``).
        tokenizer: decodes completions for the rewards; its stop ids end a completion.
        rewards: the run's rewards.
        num_generations: G.
        max_completion_len: the longest completion.
        temperature, top_k, top_p: sampling.
        scale_rewards: ``group`` | ``batch`` | ``none`` (see ``group_advantages``).
        generator: the sampling RNG (seeded per step by the recipe: exact resume).
        all_finished: see ``generate_group`` (FSDP: decode until every rank's group is done).
    """
    rows, prompts, completions, lengths = [], [], [], []
    fields: dict[str, list] = {k: [] for k in (items[0]["fields"] if items else {})}
    stop = set(tokenizer.stop_tokens)
    for item in items:
        ids, n = generate_group(model, item["prompt_ids"], num_generations, max_new_tokens=max_completion_len,
                                temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop,
                                generator=generator, all_finished=all_finished)
        for row, length in zip(ids.tolist(), n.tolist()):
            completion = row[:length]
            rows.append((item["prompt_ids"], completion))
            lengths.append(length)
            completions.append(tokenizer.decode_generated([t for t in completion if t not in stop]))
            prompts.append(item["prompt"])
            for k in fields:
                fields[k].append(item["fields"].get(k))
    total, per_reward = rewards(prompts, completions, fields)
    s = max(len(p) + len(c) for p, c in rows)
    tokens = torch.full((len(rows), s), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), s), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt_ids, completion) in enumerate(rows):
        p, c = len(prompt_ids), len(completion)
        tokens[i, : p + c] = torch.tensor(prompt_ids + completion)
        labels[i, p - 1 : p + c - 1] = torch.tensor(completion)  # position t predicts token t + 1
    return Rollout(tokens, labels, total, per_reward, group_advantages(total, num_generations, scale_rewards),
                   torch.tensor(lengths), torch.tensor([len(p) + len(c) for p, c in rows]), completions)


def policy_log_probs(model, rollout: Rollout, device: torch.device) -> torch.Tensor:
    """[B, s] log-probs of the sampled tokens under ``model`` (0 off the completions)."""
    hidden = model(rollout.tokens.to(device), return_hidden=True)
    return token_log_probs_from_hidden(hidden, rollout.labels.to(device), model.logits_from_hidden,
                                       output_weight=plain_output_weight(model))


@torch.no_grad()
def reference_log_probs(model, rollouts: list[Rollout], g, device: torch.device):
    """``(old, ref)``: the sampling policy's log-probs (only kept when a batch gets several
    updates; with one, the loss's own detached log-probs are the same numbers) and the
    adapters-off reference's (only with ``beta`` > 0); each a list of [B, s] or None."""
    old = [policy_log_probs(model, r, device) for r in rollouts] if g.num_iterations > 1 else None
    ref = None
    if g.beta:
        with disable_adapters(model):
            ref = [policy_log_probs(model, r, device) for r in rollouts]
    return old, ref


@dataclass
class UpdateStats:
    """One update's loss (the step's, summed over micro-batches) and its sums over the active
    tokens: clipped low / high / either (``clip_fractions``) and the KL (None without beta)."""

    loss: float = 0.0
    clipped: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    kl_sum: float | None = None


def rollout_backward(model, rollouts: list[Rollout], g, old, ref, device: torch.device, *, accum: int,
                     active_tokens: float, world: int = 1) -> UpdateStats:
    """Forward and backward of one update over the step's rollouts (gradients accumulate).

    Args:
        model, rollouts, old, ref: as :func:`reference_log_probs` gives them.
        g: the ``grpo`` settings.
        device: where the model runs.
        accum: micro-batches in the step (``grpo``/``bnpo``/``dr_grpo`` average over them).
        active_tokens: completion tokens of the whole step, all ranks (``dapo``'s normaliser).
        world: ranks (FSDP averages gradients over them: ``dapo``'s global sum is scaled back).

    Returns:
        the update's stats; ``loss`` is this rank's part of the step loss (summed over the
        ranks it is the step's: a token mean for ``dapo``, a mean over ranks for the others).
    """
    stats = UpdateStats()
    for i, r in enumerate(rollouts):
        logps = policy_log_probs(model, r, device)
        mask, adv = r.mask.to(device), r.advantages.to(device)
        per_token, ratio, kl = grpo_per_token_loss(
            logps, logps.detach() if old is None else old[i], adv, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
            ref_logps=None if ref is None else ref[i], beta=g.beta)
        dapo = g.loss_type == "dapo"
        # this micro-batch's share of the rank's step loss: dapo's is already normalised by the
        # whole step's tokens (all ranks); the others average over the micro-batches
        share = grpo_loss(per_token, mask, g.loss_type, max_completion_len=g.max_completion_len,
                          num_active_tokens=active_tokens)
        share = share if dapo else share / accum
        (share * world if dapo else share).backward()  # FSDP averages over ranks: dapo's global sum x world
        stats.loss += float(share.detach()) / (1 if dapo else world)  # summed over ranks: the step's loss
        stats.clipped += clip_fractions(ratio, adv, mask, epsilon=g.epsilon, epsilon_high=g.epsilon_high).cpu()
        if kl is not None:
            stats.kl_sum = (stats.kl_sum or 0.0) + float((kl.detach() * mask).sum())
    return stats


def step_metrics(rollouts: list[Rollout], updates: list[UpdateStats], active_tokens: float,
                 device: torch.device) -> dict[str, float]:
    """The step's GRPO metrics over every rank's rollouts (sums all-reduced; on one device as
    they are): reward mean and std, each reward's mean, completion length mean and max, the
    clipped fractions (TRL's clip_ratio low / high / region means), the KL (with beta) and the
    loss."""
    reward = torch.cat([r.rewards for r in rollouts]).double()
    lengths = torch.cat([r.completion_lengths for r in rollouts]).double()
    names = list(rollouts[0].per_reward)
    per_reward = [float(torch.cat([r.per_reward[n] for r in rollouts]).double().sum()) for n in names]
    clipped = sum(u.clipped for u in updates).tolist()  # low, high, either
    with_kl = updates[0].kl_sum is not None
    sums = all_reduce_sum([float(reward.sum()), float((reward ** 2).sum()), float(reward.numel()),
                           float(lengths.sum()), *clipped, sum(u.kl_sum or 0.0 for u in updates),
                           sum(u.loss for u in updates), *per_reward], device)
    total, square, n, length, low, high, region, kl, loss, *per_reward = sums
    mean = total / n
    variance = max(square - n * mean * mean, 0.0) / max(n - 1, 1)
    longest = float(all_gather_stack(lengths.max().float().reshape(1).to(device)).max())
    world_updates = active_tokens * len(updates)
    row = {"reward/mean": mean, "reward/std": variance ** 0.5,
           **{f"reward/{k}": v / n for k, v in zip(names, per_reward)},
           "completion_len/mean": length / n, "completion_len/max": longest,
           **{f"clip_ratio/{k}": v / max(world_updates, 1.0) for k, v in
              (("low", low), ("high", high), ("region", region))},
           "loss": loss / max(len(updates), 1)}
    if with_kl:
        row["kl"] = kl / max(world_updates, 1.0)
    return row
