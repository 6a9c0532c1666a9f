"""Critic-free policy losses (GRPO, Dr. GRPO, DAPO, BNPO, RLOO, GSPO, CISPO, SAPO): the per-token
objective with one advantage per completion (or per token), and the ways of aggregating its token losses.

Every aggregation is a sum over completion tokens (or completions) divided by a count, so it is
written as two summable parts, `LossTerms(numerator, denominator)`: a micro-batch contributes
its numerator, and the loss of an optimizer step is the sum of the numerators of its micro-batches
(on every device) divided by the sum of their denominators over the aggregation's scope. That is
exactly the same number however the rows are split into micro-batches, accumulation steps or
devices, which a per-micro-batch mean is not.

    loss_type   numerator (per micro-batch)        denominator (summed over the scope)   scope
    grpo        sum_i  mean_t l_it                  completions                           optimizer step
    bnpo        sum_it l_it                         completion tokens                     generation batch
    dr_grpo     sum_it l_it                         completions x max_completion_length   optimizer step
    dapo        sum_it l_it                         completion tokens                     optimizer step
    cispo       as dapo                                                                   optimizer step
    sapo        as grpo                                                                   optimizer step

"grpo" is the paper's (Shao et al. 2024): each completion weighs the same, so a long completion's
tokens weigh less each. "dr_grpo" (Liu et al. 2025) divides by a constant, removing that length
bias. "dapo" (Yu et al. 2025) weighs every token of the optimizer step the same. "bnpo" weighs
every token of the whole generation batch (all its optimizer steps) the same; with one optimizer
step per generation batch it equals "dapo". (TRL 1.16's "bnpo" divides each micro-batch by its own
tokens, which changes with the micro-batch size; here every variant is layout-invariant.)
"cispo" and "sapo" name an objective as well (see `grpo_token_losses`), each aggregated as TRL
aggregates it: CISPO over the tokens (as its paper), SAPO per completion (as GRPO).
Completions and tokens are counted after masking: a completion with no unmasked token (e.g. a
truncated one under mask_truncated_completions) counts for nothing.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from plpost.losses.importance import ImportanceSamplingLevel, importance_log_weights
from plpost.losses.masked import masked_sum
from plpost.losses.ppo import kl_penalty, ppo_policy_loss

__all__ = [
    "GRPO_LOSS_TYPES", "GRPOTokenLosses", "LossTerms", "grpo_loss_denominator", "grpo_loss_terms", "grpo_token_losses",
    "loss_scope",
]

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
AGGREGATED_AS: dict[str, str] = {"cispo": "dapo", "sapo": "grpo"}
"""The aggregation of the loss types that also name an objective."""


class GRPOTokenLosses(NamedTuple):
    """Per-token outputs, all (B, T); 0 (False) where mask is 0."""

    token_losses: Tensor
    """The objective's per-token loss (see `grpo_token_losses`) + beta * KL_k3: what is minimised."""
    ratio: Tensor
    """r = pi / pi_old per token, or GSPO's s broadcast over its row's tokens; detached."""
    clipped_low: Tensor
    """bool: the lower clip removes the gradient (A < 0 and r < 1 - eps_low); never for cispo / sapo."""
    clipped_high: Tensor
    """bool: A > 0 and r > 1 + eps_high (cispo: r > epsilon_high, its weight is capped); never for sapo."""
    kl: Tensor | None
    """k3 estimate of KL(pi || pi_ref) per token (with its gradient), when ref_logprobs are given."""


def grpo_token_losses(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    loss_type: GRPOLossType = "grpo",
    importance_sampling_level: ImportanceSamplingLevel = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    token_weights: Tensor | None = None,
) -> GRPOTokenLosses:
    """The per-token policy objective with one advantage per completion, plus an optional KL term.

    logprobs: (B, T) log pi of the completion tokens (carries the gradient); old_logprobs: (B, T)
    under the sampling policy; advantages: (B,), one per completion, broadcast over its tokens, or
    (B, T) per token (REINFORCE++); mask: (B, T) 0/1; ref_logprobs: (B, T) under the frozen
    reference, for beta > 0. With r the importance ratio of `importance_sampling_level` (the
    token's own, or GSPO's sequence ratio s, see `importance_log_weights`), per token:
        grpo, bnpo, dr_grpo, dapo:  -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)
            (PPO's clipped surrogate, GRPO's objective; with "sequence", GSPO's J_GSPO, whose
            paper uses epsilon_low = 3e-4, epsilon_high = 4e-4).
        cispo:  -sg(min(r, epsilon_high)) A log pi(y_t)   (CISPO, MiniMax-M1, arXiv 2506.13585,
            its J_CISPO with the clipped importance weight sg(clip(r, 1 - eps_low, 1 + eps_high));
            as in ScaleRL, arXiv 2510.13786, and TRL the weight is only capped, at epsilon_high
            itself, e.g. 5.0). Its gradient is the REINFORCE gradient weighted by the capped
            ratio: no token loses its gradient. (Its value is not a surrogate's: -A log pi.)
        sapo:   -f(r) A,  f(r) = sigmoid(tau (r - 1)) * 4 / tau   (SAPO, Gao et al. 2025,
            arXiv 2511.20347: a soft gate in place of the hard clip), tau = sapo_temperature_pos
            where A > 0 and sapo_temperature_neg elsewhere. f'(1) = 1, so at r = 1 the gradient
            is GRPO's; far from 1 it fades smoothly instead of being cut.
    token_weights: (B, T) or (B, 1) constants the policy loss is multiplied by (the off-policy
    correction of `off_policy_weights`, the entropy mask of `top_entropy_mask`); None: 1.
    Plus beta * (exp(ref - logp) - (ref - logp) - 1), the k3 estimator (>= 0, gradient 0 where
    pi == pi_ref), as in GRPO's paper, not weighted. Unreduced: aggregate with `grpo_loss_terms`.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")
    keep = mask.to(torch.bool)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    advantages = advantages.detach()
    per_token = (advantages[:, None] if advantages.dim() == 1 else advantages).expand_as(logprobs)
    per_token = torch.where(keep, per_token, zero)
    log_ratio = importance_log_weights(logprobs, old_logprobs, mask, level=importance_sampling_level)
    if loss_type == "cispo":
        ratio = torch.exp(log_ratio.clamp(max=20.0)).expand_as(logprobs)
        weight = ratio.clamp(max=epsilon_high).detach()
        token_losses = -weight * per_token * torch.where(keep, logprobs, zero)
        clipped_low, clipped_high = torch.zeros_like(keep), (ratio > epsilon_high) & (per_token > 0)
    elif loss_type == "sapo":
        ratio = torch.exp(log_ratio.clamp(max=20.0)).expand_as(logprobs)
        tau = torch.where(per_token > 0, sapo_temperature_pos, sapo_temperature_neg).to(logprobs.dtype)
        token_losses = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * per_token
        clipped_low = clipped_high = torch.zeros_like(keep)
    else:
        # The clipped surrogate of a log-ratio d: ppo_policy_loss of (d, 0). A (B, 1) sequence ratio
        # broadcasts over its tokens, all sharing the row's advantage.
        policy = ppo_policy_loss(
            log_ratio.expand_as(logprobs), torch.zeros_like(logprobs), per_token, mask,
            clip_ratio=epsilon_low, clip_ratio_high=epsilon_high,
        )
        token_losses, ratio = policy.token_losses, policy.ratio
        clipped_low, clipped_high = policy.clipped & (per_token < 0), policy.clipped & (per_token > 0)
    if token_weights is not None:
        token_losses = token_losses * token_weights.detach()
    token_losses = torch.where(keep, token_losses, zero)
    kl = None
    if ref_logprobs is not None:
        kl = torch.where(keep, kl_penalty(logprobs, ref_logprobs.detach(), estimator="k3"), zero)
        token_losses = token_losses + beta * kl
    return GRPOTokenLosses(
        token_losses=token_losses,
        ratio=torch.where(keep, ratio.detach(), zero),
        clipped_low=clipped_low & keep,
        clipped_high=clipped_high & keep,
        kl=kl,
    )


class LossTerms(NamedTuple):
    """A micro-batch's share of an aggregated loss: loss = sum(numerators) / sum(denominators)."""

    numerator: Tensor
    """Scalar, carries the gradient."""
    denominator: Tensor
    """Scalar count (float, no gradient)."""


def grpo_loss_terms(
    token_losses: Tensor, mask: Tensor, *, loss_type: GRPOLossType, max_completion_length: int | None = None
) -> LossTerms:
    """The numerator and denominator that `loss_type` contributes for these rows (table above).

    token_losses, mask: (B, T); mask 0/1. max_completion_length: the completion token budget
    (max_new_tokens), needed by "dr_grpo" only.

    E.g. two completions with token losses (1, 2) and (3,) (masks (1, 1), (1, 0)):
    grpo: numerator 1.5 + 3 = 4.5, denominator 2;   bnpo / dapo: 6 and 3;
    dr_grpo with max_completion_length 4: 6 and 2 * 4 = 8.
    """
    keep = mask.to(torch.bool)
    denominator = grpo_loss_denominator(keep, loss_type=loss_type, max_completion_length=max_completion_length)
    if AGGREGATED_AS.get(loss_type, loss_type) == "grpo":
        tokens = keep.sum(-1).clamp(min=1).to(token_losses.dtype)
        return LossTerms((masked_sum(token_losses, keep, dim=-1) / tokens).sum(), denominator)
    return LossTerms(masked_sum(token_losses, keep), denominator)


def grpo_loss_denominator(
    mask: Tensor, *, loss_type: GRPOLossType, max_completion_length: int | None = None
) -> Tensor:
    """The denominator of `grpo_loss_terms` alone: it depends on the mask only, so a stage can sum
    it over a whole optimizer step (or generation batch) before any forward. Scalar float."""
    keep = mask.to(torch.bool)
    tokens = keep.sum(-1)
    completions = (tokens > 0).sum().float()
    loss_type = AGGREGATED_AS.get(loss_type, loss_type)
    if loss_type == "grpo":
        return completions
    if loss_type in ("bnpo", "dapo"):
        return tokens.sum().float()
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length >= 1")
        return completions * max_completion_length
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")


def loss_scope(loss_type: GRPOLossType) -> Literal["optimizer_step", "generation_batch"]:
    """Over what the denominators of `loss_type` are summed (see the table above)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")
    return "generation_batch" if loss_type == "bnpo" else "optimizer_step"
