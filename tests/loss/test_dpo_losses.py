"""Preference losses against TRL 1.16 itself (DPOTrainer._compute_loss, CPOTrainer.cpo_loss and
CPOTrainer.get_batch_logps called on minimal stand-in objects) and against the written formulas.

Tolerances: fp32 inputs, the same math in a different order -> 1e-6 relative.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.modules.loss import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    sequence_log_probs,
    sequence_log_probs_from_hidden,
    simpo_loss,
)

TOL = dict(rtol=1e-6, atol=1e-6)


def _logps(b: int, seed: int):
    """Random summed log-probs (negative, of realistic size) and response lengths."""
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(b, generator=g) * 60 + 1) for _ in range(4))
    nc = torch.randint(1, 40, (b,), generator=g)
    nr = torch.randint(1, 40, (b,), generator=g)
    return pc, pr, rc, rr, nc, nr


# ------------------------------------------------------------------ TRL DPOTrainer as oracle
def _trl_dpo(loss_type, pc, pr, rc, rr, nc, nr, *, beta, label_smoothing=0.0):
    """Run TRL's DPOTrainer._compute_loss with precomputed reference log-probs on a fake model
    whose per-token log-probs sum to the given sequence values. Returns (loss, metrics)."""
    from trl import DPOTrainer

    b = pc.shape[0]
    lengths = torch.cat([nc, nr])  # [2b]
    width = int(lengths.max()) + 1
    # completion_mask[:, 0] = 0 so the shifted and unshifted masks count the same tokens
    pos = torch.arange(width)[None]
    completion_mask = ((pos >= 1) & (pos <= lengths[:, None])).long()  # [2b, width]
    shift_mask = completion_mask[:, 1:].float()
    # spread each sequence value evenly over its completion tokens
    per_token = shift_mask * (torch.cat([pc, pr]) / lengths)[:, None]  # [2b, width - 1]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    fake_model = lambda **kw: outputs  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, fake_model, inputs, return_outputs=False)
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_reference_losses_equal_trl_dpo_trainer(loss_type, beta):
    pc, pr, rc, rr, nc, nr = _logps(8, seed=int(beta * 10) + len(loss_type))
    expected, metrics = _trl_dpo(loss_type, pc, pr, rc, rr, nc, nr, beta=beta)
    losses, chosen_r, rejected_r = preference_loss(
        loss_type, torch.cat([pc, pr]), torch.cat([rc, rr]), torch.cat([nc, nr]), beta=beta
    )
    # TRL re-sums the per-token pieces the fake model spread out: rounding ~1e-7 relative
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-5, atol=1e-6)
    assert chosen_r.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-5, abs=1e-6)
    assert rejected_r.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-5, abs=1e-6)
    assert (chosen_r > rejected_r).float().mean().item() == pytest.approx(metrics["rewards/accuracies"])
    assert (chosen_r - rejected_r).mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.05, 0.3])
def test_sigmoid_label_smoothing_equals_trl_aot_for_single_pairs(label_smoothing):
    """TRL 1.16 dropped label smoothing from its sigmoid loss; its `aot` loss keeps the
    conservative-DPO form and, for a batch of one pair (sorting is then the identity), is
    exactly our smoothed sigmoid loss."""
    pc, pr, rc, rr, nc, nr = _logps(4, seed=7)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=label_smoothing)
    for i in range(4):
        one = [t[i : i + 1] for t in (pc, pr, rc, rr, nc, nr)]
        expected, _ = _trl_dpo("aot", *one, beta=0.3, label_smoothing=label_smoothing)
        torch.testing.assert_close(losses[i], expected, rtol=1e-5, atol=1e-6)  # re-summed, as above


# ------------------------------------------------------------------ formulas (papers / TRL docs)
def test_dpo_formula_and_edge_cases():
    pc, pr, rc, rr, _, _ = _logps(16, seed=1)
    beta, eps = 0.25, 0.1
    z = (pc - pr) - (rc - rr)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    torch.testing.assert_close(losses, expected, **TOL)
    torch.testing.assert_close(chosen_r, beta * (pc - rc), **TOL)
    torch.testing.assert_close(rejected_r, beta * (pr - rr), **TOL)
    # policy == reference: log 2 whatever beta and eps
    same, r1, r2 = dpo_loss(pc, pr, pc, pr, beta=3.0, label_smoothing=0.2)
    torch.testing.assert_close(same, torch.full_like(same, math.log(2)), **TOL)
    assert (r1 == 0).all() and (r2 == 0).all()
    # a huge margin: no overflow, loss -> 0 without smoothing
    big, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert big.item() == 0.0


def test_rewards_are_detached_and_losses_differentiable():
    pc = torch.tensor([-3.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0], requires_grad=True)
    ref = torch.tensor([-3.5, -3.0])
    n = torch.tensor([3, 4])
    for loss_type in ("sigmoid", "ipo", "hinge", "simpo"):
        losses, c, r = preference_loss(loss_type, torch.cat([pc, pr]), torch.cat([ref, ref]), torch.cat([n, n]),
                                       beta=0.5, gamma=0.1)
        assert not c.requires_grad and not r.requires_grad
        losses.sum().backward()
        assert pc.grad is not None
        pc.grad = pr.grad = None


def test_ipo_is_length_normalised():
    pc, pr, rc, rr, nc, nr = _logps(8, seed=2)
    beta = 0.2
    losses, _, _ = ipo_loss(pc, pr, rc, rr, nc, nr, beta=beta)
    expected = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(losses, expected, **TOL)
    # doubling every log-ratio and every length leaves IPO unchanged
    doubled, _, _ = ipo_loss(2 * pc, 2 * pr, 2 * rc, 2 * rr, 2 * nc, 2 * nr, beta=beta)
    torch.testing.assert_close(doubled, losses, **TOL)


def test_hinge_formula():
    pc, pr, rc, rr, _, _ = _logps(8, seed=3)
    losses, _, _ = hinge_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(losses, torch.relu(1 - 0.5 * ((pc - pr) - (rc - rr))), **TOL)


# ------------------------------------------------------------------ SimPO vs TRL's CPO trainer
def _trl_cpo(avg_c, avg_r, *, beta, gamma, label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    fake = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")), loss_type="simpo",
                           simpo_gamma=gamma, beta=beta, label_smoothing=label_smoothing)
    return CPOTrainer.cpo_loss(fake, avg_c, avg_r)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (10.0, 0.0, 0.1), (0.5, 3.0, 0.2)])
def test_simpo_equals_trl_cpo_trainer(beta, gamma, eps):
    """TRL's CPO trainer feeds cpo_loss per-token AVERAGED log-probs for simpo; ours takes sums +
    lengths and normalises itself."""
    pc, pr, _, _, nc, nr = _logps(8, seed=int(beta * 7 + gamma * 3))
    expected = _trl_cpo(pc / nc, pr / nr, beta=beta, gamma=gamma, label_smoothing=eps)
    got = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=eps)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)


def test_simpo_length_normalisation():
    """A response twice as long with twice the summed log-prob has the same SimPO reward."""
    pc, pr = torch.tensor([-10.0]), torch.tensor([-12.0])
    n = torch.tensor([5])
    one = simpo_loss(pc, pr, n, n, beta=2.0, gamma=0.5)
    two = simpo_loss(2 * pc, pr, 2 * n, n, beta=2.0, gamma=0.5)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(one[1], torch.tensor([2.0 * -10.0 / 5]), **TOL)
    # gamma shifts the logit: the loss at equal rewards is -log sigmoid(-gamma)
    eq, _, _ = simpo_loss(pc, pc, n, n, beta=2.0, gamma=0.7)
    torch.testing.assert_close(eq, -F.logsigmoid(torch.tensor([-0.7])), **TOL)


def test_preference_loss_rejects_unknown_and_missing_reference():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("kto", x, x, x, beta=0.1)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("sigmoid", x, None, x, beta=0.1)


# ------------------------------------------------------------------ per-sequence log-probs
def _labelled(b=3, s=10, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, vocab, generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[:, :3] = -100  # prompt
    labels[0, 7:] = -100  # padding
    labels[:, -1] = -100
    return logits, labels


def test_sequence_log_probs_equal_trl_get_batch_logps():
    """TRL's get_batch_logps takes UNSHIFTED labels (it shifts itself); ours are pre-shifted."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logits, labels = _labelled()
    unshifted = torch.cat([torch.full((labels.shape[0], 1), -100), labels[:, :-1]], dim=1)
    ours, n = sequence_log_probs(logits, labels)
    torch.testing.assert_close(ours, CPOTrainer.get_batch_logps(logits, unshifted), **TOL)
    torch.testing.assert_close(ours / n, CPOTrainer.get_batch_logps(logits, unshifted, average_log_prob=True), **TOL)
    assert n.tolist() == [4, 6, 6]


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_log_probs_from_hidden_match_full_logits_with_grads(chunk_size):
    """Only labelled positions pass the head, chunked + checkpointed: same values and grads as
    the full-logits path (fp32, 1e-5: summation order only)."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 37, bias=False)
    hidden = torch.randn(3, 10, 8, generator=g, requires_grad=True)
    _, labels = _labelled()
    full, n_full = sequence_log_probs(head(hidden), labels)
    (full * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    chunked, n = sequence_log_probs_from_hidden(hidden, labels, head, chunk_size=chunk_size)
    (chunked * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(n, n_full)
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, grads[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        nograd, _ = sequence_log_probs_from_hidden(hidden, labels, head, chunk_size=chunk_size)
    torch.testing.assert_close(nograd, full.detach(), rtol=1e-5, atol=1e-5)
