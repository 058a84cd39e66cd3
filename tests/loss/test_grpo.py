"""GRPO's advantages and losses against TRL 1.16: the loss through ``GRPOTrainer._compute_loss``
itself (its per-token log-probs stubbed with fixed values, as tests/loss/test_dpo_losses.py does
for DPO), the advantages against TRL's formula with its own ``nanstd``. fp32; the loss and
gradients to 1e-6 relative (the same operations), advantages exactly up to rounding (1e-6)."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from tunelab.modules.loss.grpo import clip_fractions, group_advantages, grpo_loss, grpo_per_token_loss

B, T, G = 6, 9, 3


def _fixed(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g)  # far enough off that some ratios clip
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.tensor([9, 4, 7, 1, 9, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    advantages = torch.randn(B, generator=g)
    return logps, old, ref, mask, advantages


def _trl_loss(loss_type, logps, old, ref, mask, advantages, *, beta, epsilon, epsilon_high, max_len, accum=1):
    from trl import GRPOTrainer

    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x, sync_gradients=True)
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        epsilon_low=epsilon, epsilon_high=epsilon_high, loss_type=loss_type, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=accum,
        max_completion_length=max_len, accelerator=accelerator, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=accum))
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,epsilon_high", [(0.0, 0.2), (0.04, 0.28)])
def test_loss_and_gradient_equal_trl(loss_type, beta, epsilon_high):
    base, old, ref, mask, adv = _fixed()
    ours_logps, trl_logps = base.clone().requires_grad_(), base.clone().requires_grad_()
    per_token, ratio, kl = grpo_per_token_loss(ours_logps, old, adv, epsilon=0.2, epsilon_high=epsilon_high,
                                               ref_logps=ref, beta=beta)
    ours = grpo_loss(per_token, mask, loss_type, max_completion_len=T, num_active_tokens=float(mask.sum()))
    theirs, metrics = _trl_loss(loss_type, trl_logps, old, ref, mask, adv, beta=beta, epsilon=0.2,
                                epsilon_high=epsilon_high, max_len=T)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward(), theirs.backward()
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, rtol=1e-6, atol=1e-7)
    low, high, region = (clip_fractions(ratio, adv, mask, epsilon=0.2, epsilon_high=epsilon_high)
                         / mask.sum()).tolist()
    assert (low, high, region) == pytest.approx((metrics["clip_ratio/low_mean"][0], metrics["clip_ratio/high_mean"][0],
                                                 metrics["clip_ratio/region_mean"][0]), rel=1e-6)
    assert region > 0  # the fixed ratios do clip
    if beta:
        assert (kl * mask).sum().item() / mask.sum().item() == pytest.approx(metrics["kl"][0], rel=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl_formula(scale):
    """TRL: A = r - group mean, divided by (nanstd over the group or the batch, unbiased) + 1e-4
    unless scale_rewards="none"."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25])
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    std = {"group": nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G), "batch": nanstd(rewards).expand(9),
           "none": None}[scale]
    want = rewards - mean if std is None else (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, G, scale), want, rtol=1e-6, atol=1e-6)
    assert group_advantages(rewards, G, "group")[3:6].abs().max() == 0  # an all-equal group teaches nothing


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="unknown GRPO loss_type"):
        grpo_loss(torch.zeros(2, 3), torch.ones(2, 3), "ppo")
    with pytest.raises(ValueError, match="beta > 0 needs the reference"):
        grpo_per_token_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), epsilon=0.2, beta=0.1)
