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
from dataclasses import dataclass

import torch

from tunelab.modules.generation import generate_group
from tunelab.modules.loss import IGNORE_INDEX
from tunelab.modules.loss.grpo import group_advantages
from tunelab.training.rewards import RewardSet

__all__ = ["Rollout", "roll_out"]


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
             scale_rewards: str, generator: torch.Generator | None) -> Rollout:
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
    """
    rows, prompts, completions, lengths = [], [], [], []
    fields: dict[str, list] = {k: [] for k in (items[0]["fields"] if items else {})}
    stop = set(tokenizer.stop_tokens)
    for item in items:
        ids, n = generate_group(model, item["prompt_ids"], num_generations, max_new_tokens=max_completion_len,
                                temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop,
                                generator=generator)
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
