"""Generalised advantage estimation over right-padded response tokens."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gae"]


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per response token.

    rewards, values, mask: (B, T). rewards[b, t] is the reward after token t (typically the
    per-token KL penalty, plus the score on the last valid token); values[b, t] is V(s_t);
    mask is 1 on valid response tokens, which form a prefix of each row (right padding).
    The episode ends after the last valid token, so the value after it is 0:
        delta_t = r_t + gamma * V_{t+1} - V_t        (V_{t+1} = 0 after the last valid token)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A = 0 after the last valid token)
        R_t     = A_t + V_t                          (the value targets)
    Returns (advantages, returns), both (B, T), detached, 0 where mask is 0 (padding may hold
    anything, NaN included). Not whitened: see masked_whiten.

    Worked example, one row of 3 valid tokens, gamma = 0.5, lam = 0.5 (gamma * lam = 0.25),
    r = (0, 0, 1), V = (0.5, 0.5, 0.5):
        delta = (0 + 0.25 - 0.5, 0 + 0.25 - 0.5, 1 + 0 - 0.5) = (-0.25, -0.25, 0.5)
        A_2 = 0.5;  A_1 = -0.25 + 0.25 * 0.5 = -0.125;  A_0 = -0.25 + 0.25 * -0.125 = -0.28125
        R = A + V = (0.21875, 0.375, 1.0)
    """
    rewards, values = rewards.detach(), values.detach()
    keep = mask.to(torch.bool)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    # A python loop over time, vectorised over the batch: the recursion is sequential in t.
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, zero)
        advantages[:, t] = advantage
        next_value = torch.where(keep[:, t], values[:, t], zero)
        next_advantage = advantage
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns
