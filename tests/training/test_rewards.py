"""GRPO rewards (training/rewards.py): the built-ins, weights, and failures contained."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.training.rewards import RewardSet, build_rewards, exact_answer, extract_answer, format_reward, length_penalty


@pytest.mark.parametrize("text,want", [
    ("so the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} then later \\boxed{7}", "7"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("It costs $1,250.50 in all.", "1,250.50"),
    ("no number here", None),
    ("#### ", None),
])
def test_extract_answer_forms(text, want):
    assert extract_answer(text) == want


def test_exact_answer_compares_numbers_as_numbers():
    completions = ["#### 1,000", "\\boxed{1000.0}", "the answer is 999", "\\boxed{Paris}", "42.", "so 72"]
    answers = [1000, "1000", 1000, "paris", "42", "48 + 24 = <<48+24=72>>72 clips.\n#### 72"]
    assert exact_answer([""] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_format_and_length():
    assert format_reward(["p", "p"], ["a \\boxed{3}", "3"]) == [1.0, 0.0]
    assert format_reward(["p"], ["<think>\nx</think>"], pattern=r"^<think>.*</think>$") == [1.0]
    assert length_penalty(["p"] * 3, ["a" * 10, "a" * 15, "a" * 40], max_chars=10) == [0.0, -0.5, -1.0]


def test_weighted_sum_and_a_failing_reward_is_contained(capsys):
    def picky(prompts, completions, **_):
        if any("boom" in c for c in completions):
            raise RuntimeError("cannot score boom")
        return [1.0] * len(completions)

    rewards = build_rewards([{"_component_": "tunelab.training.rewards.exact_answer", "weight": 2.0},
                             {"_component_": "tunelab.training.rewards.format_reward", "weight": 0.5}])
    total, each = rewards(["q", "q"], ["\\boxed{4}", "5"], {"answer": [4, 4]})
    torch.testing.assert_close(total, torch.tensor([2.5, 0.0]))
    assert set(each) == {"exact_answer", "format_reward"}
    from tunelab.training.rewards import Reward

    contained = RewardSet([Reward("picky", picky, 1.0)])
    total, _ = contained(["q1", "q2", "q3"], ["fine", "boom", "fine"], {})
    torch.testing.assert_close(total, torch.tensor([1.0, 0.0, 1.0]))
    assert contained.failures == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["reward picky failed on row 1 (prompt 'q2'): RuntimeError: cannot score boom; scored 0"]


def test_bad_reward_configs():
    with pytest.raises(ConfigError, match="rewards is empty"):
        build_rewards([])
    with pytest.raises(ConfigError, match="needs a _component_"):
        build_rewards([{"weight": 1.0}])
    with pytest.raises(ConfigError, match="not an allowed component"):
        build_rewards([{"_component_": "os.system"}])
    with pytest.raises(ConfigError, match="weight must be a finite number"):
        build_rewards([{"_component_": "tunelab.training.rewards.exact_answer", "weight": "high"}])
    wrong = build_rewards([{"_component_": "tunelab.training.rewards.length_penalty", "max_chars": 0}])
    total, _ = wrong(["q"], ["abc"], {})  # ZeroDivisionError inside: contained, scored 0
    assert total.tolist() == [0.0] and wrong.failures == 1
