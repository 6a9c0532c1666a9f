"""Reward modelling: Bradley-Terry loss on preference pairs, and the reward-centering penalty."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RewardLoss", "bradley_terry_loss", "reward_centering_penalty"]


class RewardLoss(NamedTuple):
    """Per-pair Bradley-Terry outputs, all (N,)."""

    losses: Tensor
    """-log sigmoid(r_chosen - r_rejected - margin)."""
    margins: Tensor
    """r_chosen - r_rejected (without the `margin` offset), detached: a metric."""
    accurate: Tensor
    """bool, r_chosen > r_rejected (a tie counts as wrong)."""


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
) -> RewardLoss:
    """Bradley-Terry negative log-likelihood that the chosen response beats the rejected one.

    chosen_rewards, rejected_rewards: (N,) scalar rewards of the two responses of each pair.
    margin: optional (N,) (or scalar) required gap, as in Llama 2 and TRL's `margin` column:
    the loss is -log sigmoid(r_c - r_r - margin), so a pair marked as a clear preference must be
    won by at least `margin` before its loss gets small. None means 0.
    Returns per-pair values; the caller reduces (mean over pairs).
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    return RewardLoss(losses=-F.logsigmoid(logits), margins=diff.detach(), accurate=diff.detach() > 0)


def reward_centering_penalty(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """(r_chosen + r_rejected)^2 per pair, shape (N,).

    The auxiliary term of Eisenstein et al. (2023), "Helping or Herding?": Bradley-Terry only sees
    reward differences, so this pulls the mean reward of each pair to 0 and makes rewards of
    different models (and runs) comparable. The caller multiplies by a small coefficient
    (e.g. 0.01) and adds it to the Bradley-Terry loss.
    """
    return torch.square(chosen_rewards + rejected_rewards)
