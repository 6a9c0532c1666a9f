"""PPO for language models: KL penalty, per-token rewards, clipped policy and value losses, adaptive
KL, diagnostics.

All per-token tensors are (B, T) over response tokens; `mask` is 1 on valid response tokens.
Outputs are unreduced; the caller reduces with `masked_mean` (or a global token count) visibly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from plpost.losses.masked import masked_var

__all__ = [
    "KL_ESTIMATORS",
    "PolicyLoss",
    "ValueLoss",
    "kl_penalty",
    "ppo_policy_loss",
    "clipped_value_loss",
    "adaptive_kl_coefficient",
    "explained_variance",
    "per_token_rewards",
]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3", "abs", "mse")

# exp() of a log-ratio is clamped to [-20, 20] first. A policy that moved far from the sampling
# (or reference) policy on a token, or a -inf log-prob on a padded one, would otherwise overflow
# exp() to inf and turn the loss and every gradient into inf/NaN. e^20 ~ 4.9e8 is far beyond any
# ratio the clip range lets through, so the clamp changes nothing a sane update would see.
_MAX_LOG_RATIO = 20.0


def _zero_where_not(mask: Tensor, values: Tensor) -> Tensor:
    return torch.where(mask.to(torch.bool), values, torch.zeros((), dtype=values.dtype, device=values.device))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of sampled tokens, (B, T).

    logprobs, ref_logprobs: (B, T) log pi(a_t) and log pi_ref(a_t) of the sampled tokens.
    With d = logprobs - ref_logprobs (Schulman, "Approximating KL divergence", 2020):
      - "k1": d (unbiased, can be negative per token)
      - "k3": exp(-d) + d - 1 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0);
              ref - logp is clamped to [-20, 20] before exp so it stays finite
      - "abs": |d|;   "mse": 0.5 * d^2 (the k2 estimator)
    Every estimator is 0 where logprobs == ref_logprobs. Not masked: the caller masks.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k3":
        r = (-d).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        # expm1(r) - r, not exp(r) - r - 1: for small r the latter rounds to tiny negative values.
        return torch.expm1(r) - r
    if estimator == "abs":
        return d.abs()
    if estimator == "mse":
        return 0.5 * d.square()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


class PolicyLoss(NamedTuple):
    """Per-token PPO policy outputs, all (B, T); every one is 0 (False) where mask is 0."""

    token_losses: Tensor
    """max(-A * r, -A * clip(r, 1 - eps, 1 + eps))."""
    ratio: Tensor
    """r = pi(a) / pi_old(a), detached."""
    clipped: Tensor
    """bool, the clipped term is the larger (its gradient is 0): mean of it is the clip fraction."""
    approx_kl: Tensor
    """0.5 * (log pi - log pi_old)^2 (unclamped), detached: the k2 estimate of KL(pi_old || pi)."""


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: float,
    clip_ratio_high: float | None = None,
) -> PolicyLoss:
    """PPO clipped surrogate (Schulman et al. 2017), per token, to be minimised.

    logprobs: (B, T) log pi(a_t) under the current policy (carries the gradient);
    old_logprobs: (B, T) under the policy that sampled; advantages: (B, T); mask: (B, T) 0/1.
    old_logprobs and advantages are treated as constants (detached).
    r = exp(clamp(logprobs - old_logprobs, -20, 20)) (clamped so extreme log-ratios stay finite),
    token_losses = max(-A r, -A clip(r, 1 - clip_ratio, 1 + clip_ratio_high)), 0 where mask is 0;
    clip_ratio_high defaults to clip_ratio (symmetric). A larger upper bound is DAPO's
    "clip-higher" (Yu et al. 2025): tokens with A > 0 may gain more probability before clipping.
    The caller reduces, e.g. masked_mean(token_losses, mask).
    """
    keep = mask.to(torch.bool)
    # Padding is replaced before any arithmetic, so NaN/inf there cannot reach a gradient.
    diff = _zero_where_not(keep, logprobs - old_logprobs.detach())
    ratio = torch.exp(diff.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    advantages = _zero_where_not(keep, advantages.detach())
    unclipped = -advantages * ratio
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    clipped_term = -advantages * ratio.clamp(1 - clip_ratio, 1 + high)
    token_losses = torch.maximum(unclipped, clipped_term)
    return PolicyLoss(
        token_losses=_zero_where_not(keep, token_losses),
        ratio=_zero_where_not(keep, ratio.detach()),
        clipped=(clipped_term > unclipped).detach() & keep,
        approx_kl=0.5 * diff.detach().square(),
    )


class ValueLoss(NamedTuple):
    """Per-token value-head outputs, all (B, T); 0 (False) where mask is 0."""

    token_losses: Tensor
    """0.5 * max((v - R)^2, (v_clipped - R)^2)."""
    clipped: Tensor
    """bool, the clipped error is the larger: mean of it is the value clip fraction."""


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float,
) -> ValueLoss:
    """Clipped value loss of PPO2 / TRL, per token.

    values: (B, T) current value predictions (carry the gradient); old_values: (B, T) at rollout
    time; returns: (B, T) targets (e.g. from `gae`); mask: (B, T) 0/1. old_values and returns are
    constants (detached). v_clipped = old + clip(v - old, -clip_range, clip_range);
    token_losses = 0.5 * max((v - R)^2, (v_clipped - R)^2), 0 where mask is 0.
    """
    keep = mask.to(torch.bool)
    # Padding is replaced before any arithmetic, so NaN/inf there cannot reach a gradient.
    values = _zero_where_not(keep, values)
    old_values = _zero_where_not(keep, old_values.detach())
    returns = _zero_where_not(keep, returns.detach())
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    err = (values - returns).square()
    err_clipped = (v_clipped - returns).square()
    return ValueLoss(
        token_losses=_zero_where_not(keep, 0.5 * torch.maximum(err, err_clipped)),
        clipped=(err_clipped > err).detach() & keep,
    )


def adaptive_kl_coefficient(
    coef: float,
    observed_kl: float | Tensor,
    *,
    target: float,
    horizon: float,
    n_steps: int,
) -> float:
    """Next KL-penalty coefficient of the adaptive controller of Ziegler et al. (2019).

    observed_kl: the KL measured over the last `n_steps` samples (a float or scalar tensor).
    err = clip(observed_kl / target - 1, -0.2, 0.2); returns coef * (1 + err * n_steps / horizon):
    the coefficient rises when the policy drifts further than `target`, falls when it stays closer,
    by at most 20% per `horizon` samples.
    """
    err = min(max(float(observed_kl) / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + err * n_steps / horizon)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over the unmasked tokens, a scalar tensor (detached).

    values, returns, mask: (B, T). 1 is a perfect value function, 0 no better than a constant,
    negative worse. NaN when Var[R] == 0 (as in Stable-Baselines3). Both variances are the biased
    (1/n) ones; the correction would cancel in the ratio.
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    nan = torch.full((), float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return torch.where(var_returns == 0, nan, 1 - var_residual / var_returns)


def per_token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, *, kl_coef: float) -> Tensor:
    """r_t = -kl_coef * KL_t on every response token, plus the sequence score on the last one.

    kl, mask: (B, R), mask True on the policy's tokens (a prefix of each row, or the turns of a
    multi-turn episode); scores: (B,). Returns (B, R), 0 where mask is False. E.g. kl = (0.1, 0.2),
    score 1, kl_coef 0.5 -> r = (-0.05, -0.1 + 1) = (-0.05, 0.9).
    """
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards
