"""Importance weights of the critic-free policy losses: the ratio of the policy to the one that
sampled, per token or per sequence (GSPO), and the correction for a sampler whose probabilities
differ from the trained policy's (truncated or masked importance sampling, TIS / MIS).

All per-token tensors are (B, T) over completion tokens; `mask` is 1 on the tokens that count.
A sequence-level quantity is (B, 1), so it broadcasts over its row's tokens.

Micro-batch and device invariance: every function here is a function of one row at a time, and
the stages never split a row, so none of them depends on how rows are split. (What a
sequence-level weight changes is the gradient each token gets, which depends on its whole row:
that is the definition, not a layout effect.)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS", "OFF_POLICY_MODES", "SamplerMismatch", "importance_log_weights",
    "off_policy_weights", "sampler_mismatch",
]

ImportanceSamplingLevel = Literal["token", "sequence"]
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
OffPolicyMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
OFF_POLICY_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

# As in plpost.losses.ppo: exp() of a log-ratio is taken after clamping it to [-20, 20].
_MAX_LOG_RATIO = 20.0


def _masked_difference(logprobs: Tensor, other: Tensor, mask: Tensor) -> Tensor:
    """logprobs - other where mask is 1, else 0 (padding may hold NaN or -inf)."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return torch.where(mask.to(torch.bool), logprobs - other, zero)


def importance_log_weights(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, *, level: ImportanceSamplingLevel = "token"
) -> Tensor:
    """The log of the importance ratio of the policy to the sampling policy.

    logprobs: (B, T) log pi_theta of the completion tokens (carries the gradient);
    old_logprobs: (B, T) under pi_old (detached); mask: (B, T) 0/1.
        "token":    log r_t = log pi(y_t) - log pi_old(y_t), (B, T): PPO's and GRPO's ratio.
        "sequence": log s = (1 / |y|) sum_t log r_t, (B, 1): GSPO's sequence ratio (Zheng et al.
                    2025, arXiv 2507.18071, the definition of s_i(theta) under its objective J_GSPO):
                    s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|), the length-normalised
                    ratio of the whole completion, so one clip decision is taken per completion.
    |y| counts the unmasked tokens; a row with none has log s = 0. 0 where mask is 0 ("token").
    At pi = pi_old both are exactly 0, and d log s / d log pi(y_t) = 1 / |y| for each token t.
    """
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")
    log_ratio = _masked_difference(logprobs, old_logprobs.detach(), mask)
    if level == "token":
        return log_ratio
    tokens = mask.to(torch.bool).sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    return log_ratio.sum(-1, keepdim=True) / tokens


def off_policy_weights(
    logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    *,
    mode: OffPolicyMode,
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """Importance weights correcting for a sampler that is not the policy the update starts from.

    logprobs: (B, T) log pi_old of the sampled tokens as the trainer computes them (the policy
    before the update); sampler_logprobs: (B, T) the same tokens' log-probs as the sampler gave
    them (another precision, other kernels, older weights); mask: (B, T) 0/1. Detached, (B, T) for
    the token modes and (B, 1) for the sequence modes, 0 where mask is 0 (token modes).
        w_t = pi_old(y_t) / pi_sampler(y_t)           "token_*"
        w   = prod_t pi_old(y_t) / pi_sampler(y_t)    "sequence_*"  (the ratio of whole completions)
    "truncate" (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"): w <- clip(w, clip_min, clip_max), i.e. min(w, C) with clip_min None.
    "mask" (MIS, Liu et al. 2025, "When speed kills stability"): w <- w if clip_min <= w <= clip_max
    else 0, so tokens (or completions) the sampler saw very differently leave the loss.
    The policy loss of each token is multiplied by its weight. A NaN sampler log-prob (a token the
    sampler did not score) gets weight 1. TRL's `vllm_importance_sampling_mode` and
    `vllm_importance_sampling_clip_min` / `_max` are these four modes and bounds.
    """
    if mode not in OFF_POLICY_MODES:
        raise ValueError(f"unknown off-policy correction {mode!r}; expected one of {', '.join(OFF_POLICY_MODES)}")
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:
        raise ValueError(f"off-policy clip_min ({clip_min}) must be below clip_max ({clip_max})")
    difference = torch.nan_to_num(_masked_difference(logprobs.detach(), sampler_logprobs.detach(), mask), nan=0.0)
    level, _, bound = mode.partition("_")
    if level == "sequence":
        difference = difference.sum(-1, keepdim=True)
    weights = torch.exp(difference.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    if bound == "truncate":
        weights = weights.clamp(min=clip_min, max=clip_max)
    else:
        low = -torch.inf if clip_min is None else clip_min
        high = torch.inf if clip_max is None else clip_max
        weights = torch.where((weights < low) | (weights > high), torch.zeros_like(weights), weights)
    if level == "token":
        weights = torch.where(mask.to(torch.bool), weights, torch.zeros_like(weights))
    return weights


class SamplerMismatch(NamedTuple):
    """How far the sampler's log-probs are from the trainer's, over the unmasked tokens (TRL's
    `sampling/sampling_logp_difference/*` and `sampling/importance_sampling_ratio/*`)."""

    logp_difference_mean: Tensor
    logp_difference_max: Tensor
    ratio_min: Tensor
    ratio_mean: Tensor
    ratio_max: Tensor


def sampler_mismatch(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, weights: Tensor) -> SamplerMismatch:
    """|log pi_old - log pi_sampler| (mean, max) over the tokens where mask is 1 and the sampler
    gave a log-prob, and the min / mean / max of `weights` (those of `off_policy_weights`: over the
    unmasked tokens, or over the rows for a (B, 1) sequence weight). Scalars; 0 when there are none."""
    keep = mask.to(torch.bool)
    difference = (logprobs.detach() - sampler_logprobs.detach()).abs()
    difference = difference[keep & ~torch.isnan(difference)]
    ratios = weights.reshape(-1) if weights.shape[-1] == 1 else weights[keep]
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)

    def stat(values: Tensor, reduce) -> Tensor:
        return reduce(values) if values.numel() else zero

    return SamplerMismatch(
        stat(difference, torch.mean), stat(difference, torch.max),
        stat(ratios, torch.min), stat(ratios, torch.mean), stat(ratios, torch.max),
    )
