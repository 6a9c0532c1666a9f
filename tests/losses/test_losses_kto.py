"""Tests for plpost.losses.kto: by hand, against TRL 1.16's formula, and properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from plpost.losses import kto_loss, kto_reference_point

F64 = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=F64)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand():
    """beta = 0.5, z0 = 1. Desirable with r = 3: 1 - sigmoid(0.5 * (3 - 1)) = 1 - sigmoid(1) =
    sigmoid(-1); undesirable with r = -1: 1 - sigmoid(0.5 * (1 + 1)) = sigmoid(-1) too. Weights 2
    and 0.5 scale them; rewards are beta * r = 1.5 and -0.5."""
    out = kto_loss(t(-2.0, -6.0), t(-5.0, -5.0), torch.tensor([True, False]), t(1.0),
                   beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(out.losses, t(2 * sigmoid(-1), 0.5 * sigmoid(-1)))
    torch.testing.assert_close(out.rewards, t(1.5, -0.5))


def test_reference_point_by_hand():
    """Mismatched log-ratios 0.5, 1.5, -0.5 sum to 1.5 over 3 pairs: z0 = 0.5. A negative mean
    is clamped to 0, and no pair at all gives 0."""
    torch.testing.assert_close(kto_reference_point(t(1.5), torch.tensor(3)), t(0.5))
    torch.testing.assert_close(kto_reference_point(t(-2.0), torch.tensor(4)), t(0.0))
    torch.testing.assert_close(kto_reference_point(t(0.0), torch.tensor(0)), t(0.0))


def trl_kto_loss(policy, ref, labels, kl_policy, kl_ref, beta, desirable_weight, undesirable_weight):
    """TRL 1.16 `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py, loss_type="kto"), its
    loss lines as written there on one device (gather_for_metrics is the identity): the KL term
    from the batch's mismatched rows, the desirable then the undesirable losses, `nanmean`.
    TRL computes it inside the trainer (a model forward first), so it cannot be called alone."""
    kl = (kl_policy - kl_ref).mean().detach()
    kl = kl.mean().clamp(min=0)
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_logratios = policy.index_select(0, chosen_idx) - ref.index_select(0, chosen_idx)
    rejected_logratios = policy.index_select(0, rejected_idx) - ref.index_select(0, rejected_idx)
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean(), beta * chosen_logratios, beta * rejected_logratios


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_loss_and_rewards_equal_trls(seed):
    """Random batches (the mismatched log-ratios' mean positive or not): the mean of plpost's
    per-example losses, with z0 from the same mismatched rows, is TRL's loss, and the rewards
    of the desirable / undesirable examples are TRL's rewards/chosen and rewards/rejected."""
    g = torch.Generator().manual_seed(seed)
    policy, ref, kl_policy, kl_ref = (-torch.rand(10, generator=g, dtype=F64) * 20 for _ in range(4))
    labels = torch.rand(10, generator=g) < 0.6
    beta, wd, wu = 0.2, 1.0, 1.33
    expected, chosen_rewards, rejected_rewards = trl_kto_loss(policy, ref, labels, kl_policy, kl_ref, beta, wd, wu)
    z0 = kto_reference_point((kl_policy - kl_ref).sum(), torch.tensor(10))
    out = kto_loss(policy, ref, labels, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    torch.testing.assert_close(out.losses.mean(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rewards[labels], chosen_rewards)
    torch.testing.assert_close(out.rewards[~labels], rejected_rewards)


def test_gradient_by_hand_and_reference_point_carries_none():
    """d/d policy of w (1 - sigmoid(beta (r - z0))) is -w beta s (1 - s), s = sigmoid(beta (r - z0)):
    at r = z0, s = 1/2 and the gradient is -w beta / 4; the undesirable side has the opposite sign.
    z0 is a constant of the step (detached), as in the paper and TRL."""
    policy = torch.zeros(2, dtype=F64, requires_grad=True)
    z0 = torch.zeros((), dtype=F64, requires_grad=True)
    out = kto_loss(policy, torch.zeros(2, dtype=F64), torch.tensor([True, False]), z0,
                   beta=0.4, desirable_weight=1.0, undesirable_weight=2.0)
    grad, z0_grad = torch.autograd.grad(out.losses.sum(), (policy, z0), allow_unused=True)
    torch.testing.assert_close(grad, t(-0.1, 0.2))
    assert z0_grad is None and not out.rewards.requires_grad


def test_losses_are_bounded_and_finite_at_extreme_log_ratios():
    """Each loss is weight * (1 - sigmoid(.)), in [0, weight], also for log-ratios of +-1e4."""
    out = kto_loss(t(1e4, -1e4, 1e4, -1e4), t(0, 0, 0, 0), torch.tensor([True, True, False, False]), t(0.0),
                   beta=0.1, desirable_weight=1.0, undesirable_weight=3.0)
    torch.testing.assert_close(out.losses, t(0.0, 1.0, 3.0, 0.0))


def test_errors_name_what_to_fix():
    x = t(-1.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(x, x, torch.tensor([True]), t(0.0), beta=0.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(x, x, torch.tensor([True]), t(0.0), beta=0.1, undesirable_weight=-1.0)
