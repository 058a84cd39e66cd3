"""Rewards for online RL (GRPO): programmatic scores of sampled completions.

A reward is any callable ``(prompts, completions, **row_fields) -> list[float]`` (TRL's
signature): ``prompts`` and ``completions`` are the batch's texts, one entry per completion
(a prompt repeated for each of its completions), and every other column of the dataset rows
arrives as a keyword list aligned with them (e.g. ``answer``). In a config they are
``_component_`` nodes with an optional ``weight`` (default 1.0) and their own keyword
arguments::

    rewards:
      - {_component_: tunelab.training.rewards.exact_answer, weight: 1.0}
      - {_component_: tunelab.training.rewards.format_reward, weight: 0.2, pattern: '\\\\boxed\\{.+\\}'}

Built-ins: :func:`exact_answer` (the completion's final answer, as ``\\boxed{...}``, ``#### x``
or its last number, equals the row's ``answer``), :func:`format_reward` (a regular expression
is found), :func:`length_penalty` and the tiny demo's graded :func:`answer_letters`. :class:`RewardSet` combines several with their weights
and contains failures: a reward that raises scores the rows it fails on 0, says so in one line
naming the reward and the row, and counts them; the step goes on.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tunelab.errors import ConfigError
from tunelab.training.components import COMPONENT_KEY, _import_target, _plain

__all__ = ["Reward", "RewardSet", "answer_letters", "build_rewards", "exact_answer", "extract_answer",
           "format_reward", "length_penalty"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # never closed


def extract_answer(text: str) -> str | None:
    """A completion's final answer: the last ``\\boxed{...}``, else what follows the last
    ``####`` (GSM8K's form), else the last number; None when there is none."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _canonical(answer: str) -> str:
    """Compare answers as numbers where both are numbers (``1,000`` = ``1000.0``), else as text
    without surrounding ``$``, spaces and a final period."""
    a = answer.strip().strip("$").strip().rstrip(".").replace(",", "")
    try:
        value = float(a)
    except ValueError:
        return " ".join(a.split()).lower()
    return repr(value) if math.isfinite(value) else a


def exact_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, **_) -> list[float]:
    """1.0 where the completion's :func:`extract_answer` equals the row's ``answer`` (numbers
    compared as numbers), else 0.0.

    Args:
        prompts: unused (the signature every reward has).
        completions: the completions' texts.
        answer: the reference answers (a dataset column; numbers or strings; a worked solution
            ending in ``#### x`` or holding ``\\boxed{x}`` counts as its final answer x).
    """
    out = []
    for completion, ref in zip(completions, answer):
        ref = str(ref)
        if "####" in ref or "\\boxed{" in ref:  # a worked solution (GSM8K's answer column): its final answer
            ref = extract_answer(ref) or ref
        got = extract_answer(completion)
        out.append(float(got is not None and _canonical(got) == _canonical(ref)))
    return out


def format_reward(prompts: Sequence[str], completions: Sequence[str], pattern: str = r"\\boxed\{.+\}",
                  **_) -> list[float]:
    """1.0 where ``pattern`` (a regular expression, searched anywhere, ``.`` matching newlines)
    occurs in the completion, else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    return [float(regex.search(c) is not None) for c in completions]


def answer_letters(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, **_) -> list[float]:
    """Partial credit on the way to a one-word answer: the share of the completion's letters
    that occur in the row's ``answer`` (0 for a completion without letters). A toy graded
    reward: a random model already scores above 0 with it and can climb it (the tiny demo)."""
    out = []
    for completion, ref in zip(completions, answer):
        letters = [ch for ch in completion.lower() if ch.isalpha()]
        target = set(str(ref).lower())
        out.append(sum(ch in target for ch in letters) / len(letters) if letters else 0.0)
    return out


def length_penalty(prompts: Sequence[str], completions: Sequence[str], max_chars: int = 1000, **_) -> list[float]:
    """0 up to ``max_chars`` characters, then falling linearly to -1 at twice that length
    (and staying there): discourages rambling past a budget."""
    return [-min(max(len(c) - max_chars, 0) / max_chars, 1.0) for c in completions]


@dataclass
class Reward:
    """One reward of a set: its name (for logs), the callable and its weight."""

    name: str
    fn: Callable[..., Sequence[float]]
    weight: float = 1.0


@dataclass
class RewardSet:
    """Several rewards, combined as their weighted sum.

    Args:
        rewards: the rewards.
    """

    rewards: list[Reward]
    failures: int = field(default=0, init=False)  # rows scored 0 because a reward raised (all calls)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 rows: Mapping[str, Sequence]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score a batch.

        Args:
            prompts, completions: one entry per completion.
            rows: the other dataset columns, each a list aligned with ``completions``.

        Returns:
            ``(total [B] fp32, {reward name: [B] fp32})``.
        """
        each = {r.name: torch.tensor(self._score(r, prompts, completions, rows), dtype=torch.float32)
                for r in self.rewards}
        total = sum(r.weight * each[r.name] for r in self.rewards)
        return total, each

    def _score(self, reward: Reward, prompts, completions, rows) -> list[float]:
        try:
            return self._checked(reward, reward.fn(list(prompts), list(completions), **rows), len(completions))
        except Exception:  # noqa: BLE001 - user code: find the rows it fails on, score them 0
            pass
        scores = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                value = reward.fn([prompt], [completion], **{k: [v[i]] for k, v in rows.items()})
                scores += self._checked(reward, value, 1)
            except Exception as e:  # noqa: BLE001
                self.failures += 1
                print(f"reward {reward.name} failed on row {i} (prompt {prompt[:60]!r}): {type(e).__name__}: "
                      f"{str(e)[:200]}; scored 0", flush=True)
                scores.append(0.0)
        return scores

    @staticmethod
    def _checked(reward: Reward, values, n: int) -> list[float]:
        values = list(values)
        if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise TypeError(f"reward {reward.name} must return {n} numbers, returned {values!r:.200}")
        return [float(v) for v in values]


def build_rewards(nodes: Sequence[Mapping], allowed_components: Sequence[str] = ()) -> RewardSet:
    """A :class:`RewardSet` from the config's ``rewards`` list of ``_component_`` nodes (each
    with an optional ``weight`` and ``name``; other keys are the reward's keyword arguments).

    Raises:
        ConfigError: an empty list, a node without ``_component_``, a target that is not
            allowed or not importable, or a weight that is not a finite number.
    """
    if not nodes:
        raise ConfigError("rewards is empty; list at least one, e.g. [{_component_: "
                          "tunelab.training.rewards.exact_answer}]")
    rewards = []
    for i, node in enumerate(nodes):
        node = dict(_plain(node)) if isinstance(_plain(node), Mapping) else None
        if node is None or COMPONENT_KEY not in node:
            raise ConfigError(f"rewards[{i}] needs a {COMPONENT_KEY} naming the reward function")
        target = node.pop(COMPONENT_KEY)
        weight = node.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"rewards[{i}].weight must be a finite number, got {weight!r}")
        fn = _import_target(target, f"rewards[{i}]", allowed_components)
        name = str(node.pop("name", target.rsplit(".", 1)[-1]))
        rewards.append(Reward(name, functools.partial(fn, **node) if node else fn, float(weight)))
    if len({r.name for r in rewards}) != len(rewards):
        raise ConfigError("rewards: two rewards share a name; give one a name: key")
    return RewardSet(rewards)
