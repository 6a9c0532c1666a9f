"""Tests for plpost.losses.reward: Bradley-Terry loss with margins, reward centering."""

import math

import torch

from plpost.losses import bradley_terry_loss, reward_centering_penalty

F64 = torch.float64


def test_bradley_terry_by_hand():
    """Pair 0: r_c - r_r = 1: loss -log sigmoid(1) = ln(1 + e^-1). Pair 1: a tie: ln 2, and a tie is
    not accurate. Pair 2: chosen loses by 2: ln(1 + e^2)."""
    chosen = torch.tensor([2.0, 0.5, -1.0], dtype=F64)
    rejected = torch.tensor([1.0, 0.5, 1.0], dtype=F64)
    out = bradley_terry_loss(chosen, rejected)
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(2.0), math.log(1 + math.exp(2))], dtype=F64)
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(out.margins, torch.tensor([1.0, 0.0, -2.0], dtype=F64))
    assert out.accurate.tolist() == [True, False, False]


def test_margin_is_subtracted():
    """With margin 1, a pair won by exactly 1 is only a coin flip: loss ln 2. margins and accuracy
    report the raw difference, not the offset one."""
    chosen = torch.tensor([2.0, 3.0], dtype=F64)
    rejected = torch.tensor([1.0, 1.0], dtype=F64)
    out = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.5], dtype=F64))
    torch.testing.assert_close(out.losses, torch.tensor([math.log(2.0), math.log(1 + math.exp(-1.5))], dtype=F64))
    torch.testing.assert_close(out.margins, torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, margin=1.0).losses[0], torch.tensor(math.log(2.0), dtype=F64)
    )


def test_gradient_by_hand():
    """d/dr_c [-log sigmoid(r_c - r_r)] = -sigmoid(r_r - r_c): -1/2 at a tie, +1/2 for r_r."""
    chosen = torch.zeros(3, dtype=F64, requires_grad=True)
    rejected = torch.zeros(3, dtype=F64, requires_grad=True)
    gc, gr = torch.autograd.grad(bradley_terry_loss(chosen, rejected).losses.sum(), (chosen, rejected))
    torch.testing.assert_close(gc, torch.full((3,), -0.5, dtype=F64))
    torch.testing.assert_close(gr, torch.full((3,), 0.5, dtype=F64))


def test_extreme_differences_are_finite():
    """-log sigmoid(-1e4) = 1e4 (to float64 precision) and -log sigmoid(1e4) = 0: no overflow."""
    chosen = torch.tensor([-1e4, 1e4], dtype=F64, requires_grad=True)
    out = bradley_terry_loss(chosen, torch.zeros(2, dtype=F64))
    torch.testing.assert_close(out.losses, torch.tensor([1e4, 0.0], dtype=F64))
    (grad,) = torch.autograd.grad(out.losses.sum(), chosen)
    torch.testing.assert_close(grad, torch.tensor([-1.0, 0.0], dtype=F64))


def test_reward_centering_by_hand():
    """(1 + (-3))^2 = 4 and (0.5 + 0.5)^2 = 1: zero only when each pair's rewards sum to 0."""
    out = reward_centering_penalty(torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([-3.0, 0.5], dtype=F64))
    torch.testing.assert_close(out, torch.tensor([4.0, 1.0], dtype=F64))
