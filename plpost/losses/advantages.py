"""Advantages: GAE over right-padded response tokens (PPO), the critic-free baselines that
compare the G completions of one prompt (GRPO, RLOO), and REINFORCE++'s per-token returns with
their normalisation over the whole batch.

The group functions take rewards of shape (B * G,) with the G completions of each prompt
consecutive (prompt 0's G, then prompt 1's, ...), which is how the online stages lay samples out.
A NaN reward means "not applicable" (a reward function returned None): it is left out of its
group's statistics and its completion gets advantage 0.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GroupStatistics", "MomentSums", "gae", "group_advantages", "group_statistics", "leave_one_out_advantages",
    "moment_sums", "reinforce_plus_plus_advantages", "reinforce_plus_plus_returns",
]

ScaleRewards = Literal["group", "batch", "none"]


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per response token.

    rewards, values, mask: (B, T). rewards[b, t] is the reward after token t (typically the
    per-token KL penalty, plus the score on the last valid token); values[b, t] is V(s_t);
    mask is 1 on the policy's tokens: a prefix of each row (right padding), or, in a multi-turn
    episode, the policy's turns with the environment's replies between them. The recursion runs
    over the policy's tokens only: t + 1 is the policy's next token, wherever it sits (the
    environment's tokens are not actions, so they are skipped, not counted as steps). The episode
    ends after the last valid token, so the value after it is 0:
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
        # A masked position passes the next valid token's value and advantage on unchanged;
        # after the last valid token they are still the initial zeros.
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


class GroupStatistics(NamedTuple):
    """Per prompt, over the rewards of its G completions that are not NaN; all (B,)."""

    mean: Tensor
    """0 for a group with no reward."""
    std: Tensor
    """Bessel-corrected (divided by n - 1, as torch.std and TRL); 0 for a group of fewer than 2 rewards."""
    count: Tensor
    """How many of the G rewards are not NaN (long)."""


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be (B * G,) with G = num_generations = {num_generations}, got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, num_generations)


def group_statistics(rewards: Tensor, num_generations: int) -> GroupStatistics:
    """Mean, std and count of each group of `num_generations` consecutive rewards, NaNs left out.

    rewards: (B * G,). E.g. G = 4, rewards (1, 0, 0, 1): mean 0.5, std sqrt(4 * 0.25 / 3) = 0.5774.
    """
    grouped = _grouped(rewards, num_generations)
    valid = ~torch.isnan(grouped)
    count = valid.sum(1)
    filled = torch.where(valid, grouped, torch.zeros((), dtype=grouped.dtype, device=grouped.device))
    mean = filled.sum(1) / count.clamp(min=1).to(grouped.dtype)
    squares = torch.where(valid, (grouped - mean[:, None]).square(), torch.zeros_like(filled)).sum(1)
    std = torch.where(count >= 2, (squares / (count - 1).clamp(min=1).to(grouped.dtype)).sqrt(), torch.zeros_like(mean))
    return GroupStatistics(mean, std, count)


def group_advantages(
    rewards: Tensor, num_generations: int, *, scale_rewards: ScaleRewards = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024), one per completion, (B * G,).

    rewards: (B * G,), the G completions of each prompt consecutive. With mean_g and std_g the
    mean and Bessel-corrected standard deviation of completion i's group (see `group_statistics`):
        "group":  A_i = (r_i - mean_g) / (std_g + eps)      (GRPO; TRL's default, eps = 1e-4)
        "batch":  A_i = (r_i - mean_g) / (std_batch + eps)  (std over every reward given, Bessel-corrected)
        "none":   A_i =  r_i - mean_g                        (Dr. GRPO: no std, no difficulty bias)
    A group whose rewards are all equal gets A = 0 whatever the scaling. NaN rewards are left
    out of every statistic and get A = 0. Detached.

    E.g. G = 4, rewards (1, 0, 0, 1), eps = 0: mean 0.5, std 1/sqrt(3), so "group" gives
    A = +-0.5 * sqrt(3) = +-0.8660 and "none" A = +-0.5.
    """
    rewards = rewards.detach()
    grouped = _grouped(rewards, num_generations)
    stats = group_statistics(rewards, num_generations)
    valid = ~torch.isnan(grouped)
    centered = torch.where(valid, grouped - stats.mean[:, None], torch.zeros((), dtype=grouped.dtype, device=grouped.device))
    if scale_rewards == "group":
        scale = stats.std[:, None] + eps
    elif scale_rewards == "batch":
        kept = rewards[~torch.isnan(rewards)]
        scale = (kept.std() if kept.numel() >= 2 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)) + eps
    elif scale_rewards == "none":
        return centered.reshape(-1)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    # A zero scale only comes with zero deviations (eps = 0, equal rewards): 0 / 0 is taken as 0.
    return (centered / torch.where(scale > 0, scale, torch.ones_like(scale))).reshape(-1)


def leave_one_out_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """RLOO's advantages (Kool et al. 2019; Ahmadian et al. 2024), one per completion, (B * G,).

    rewards: (B * G,), the G completions of each prompt consecutive. The baseline of completion i
    is the mean of the other rewards of its group:
        A_i = r_i - (sum_g - r_i) / (n_g - 1) = n_g / (n_g - 1) * (r_i - mean_g)
    with n_g the group's rewards that are not NaN. Not scaled. NaN rewards, and groups of fewer
    than 2 rewards, get A = 0. Detached.

    E.g. rewards (1, 0, 0, 1): A_0 = 1 - (0 + 0 + 1) / 3 = 2/3, A_1 = 0 - 2/3 = -2/3.
    """
    rewards = rewards.detach()
    grouped = _grouped(rewards, num_generations)
    stats = group_statistics(rewards, num_generations)
    valid = ~torch.isnan(grouped)
    others = (stats.count - 1).clamp(min=1).to(grouped.dtype)[:, None]
    advantages = stats.count[:, None].to(grouped.dtype) / others * (grouped - stats.mean[:, None])
    usable = valid & (stats.count[:, None] >= 2)
    return torch.where(usable, advantages, torch.zeros((), dtype=grouped.dtype, device=grouped.device)).reshape(-1)


def reinforce_plus_plus_returns(
    scores: Tensor, mask: Tensor, *, token_kl: Tensor | None = None, beta: float = 0.0
) -> Tensor:
    """REINFORCE++'s per-token returns (Hu et al. 2025, arXiv 2501.03262): the reward of token t
    is r_t = -beta * KL_t, plus the completion's score on its last token, and with gamma = 1
        G_t = score - beta * sum_{s >= t} KL_s.
    scores: (B,) one per completion (a group-centred score for REINFORCE++-baseline); mask:
    (B, T) 0/1 completion tokens; token_kl: (B, T) the per-token KL estimate (k1: log pi_old -
    log pi_ref), None for beta = 0. Returns (B, T), detached, 0 where mask is 0 or the score is NaN.

    E.g. score 1, KL (0.1, 0.2, 0.3), beta 0.5: G = (1 - 0.5 * 0.6, 1 - 0.5 * 0.5, 1 - 0.5 * 0.3)
    = (0.7, 0.75, 0.85).
    """
    keep = mask.to(torch.bool) & ~torch.isnan(scores)[:, None]
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    returns = scores.detach()[:, None].expand(keep.shape)
    if token_kl is not None and beta != 0.0:
        kl = torch.where(keep, token_kl.detach().to(scores.dtype), zero)
        returns = returns - beta * kl.flip(-1).cumsum(-1).flip(-1)
    return torch.where(keep, returns, zero)


class MomentSums(NamedTuple):
    """Sums that whitening statistics are made of; add them over devices before `whiten_with`."""

    total: Tensor
    squares: Tensor
    count: Tensor


def moment_sums(values: Tensor, mask: Tensor) -> MomentSums:
    """(sum x, sum x^2, n) over the elements where mask is 1, as float64 scalars."""
    keep = mask.to(torch.bool)
    selected = values.detach()[keep].double()
    return MomentSums(selected.sum(), selected.square().sum(), keep.sum().double())


def reinforce_plus_plus_advantages(
    returns: Tensor, mask: Tensor, *, sums: MomentSums | None = None, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++'s global advantage normalisation: A_t = (G_t - mean) / sqrt(var + eps), mean
    and (Bessel-corrected) variance over every completion token of the batch, not per prompt
    (Hu et al. 2025, the normalisation of A_{q, o_t} over the global batch; OpenRLHF's).

    returns, mask: (B, T) (`reinforce_plus_plus_returns`). sums: the `moment_sums` of every
    device's returns added together (default: of these returns alone), so the statistics, and
    with them the advantages, are the same however the batch is split over devices. Detached,
    (B, T), 0 where mask is 0. Needs two tokens or more.

    E.g. returns (1, 1) and (0,): mean 2/3, var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3, so with eps 0
    A = (1/3, 1/3) * sqrt(3) and -(2/3) * sqrt(3).
    """
    keep = mask.to(torch.bool)
    sums = moment_sums(returns, keep) if sums is None else sums
    if float(sums.count) < 2:
        raise ValueError(f"REINFORCE++ normalises over the batch's tokens and needs two or more, got {int(sums.count)}")
    mean = sums.total / sums.count
    variance = ((sums.squares - sums.count * mean.square()) / (sums.count - 1)).clamp(min=0.0)
    advantages = (returns.detach().double() - mean) * torch.rsqrt(variance + eps)
    return torch.where(keep, advantages.to(returns.dtype), torch.zeros((), dtype=returns.dtype, device=returns.device))
