"""Critic-free policy losses (GRPO, Dr. GRPO, DAPO, BNPO, RLOO): the clipped per-token objective
with one advantage per completion, and the ways of aggregating its token losses.

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

"grpo" is the paper's (Shao et al. 2024): each completion weighs the same, so a long completion's
tokens weigh less each. "dr_grpo" (Liu et al. 2025) divides by a constant, removing that length
bias. "dapo" (Yu et al. 2025) weighs every token of the optimizer step the same. "bnpo" weighs
every token of the whole generation batch (all its optimizer steps) the same; with one optimizer
step per generation batch it equals "dapo". (TRL 1.16's "bnpo" divides each micro-batch by its own
tokens, which changes with the micro-batch size; here every variant is layout-invariant.)
Completions and tokens are counted after masking: a completion with no unmasked token (e.g. a
truncated one under mask_truncated_completions) counts for nothing.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from plpost.losses.masked import masked_sum
from plpost.losses.ppo import kl_penalty, ppo_policy_loss

__all__ = [
    "GRPO_LOSS_TYPES", "GRPOTokenLosses", "LossTerms", "grpo_loss_denominator", "grpo_loss_terms", "grpo_token_losses",
    "loss_scope",
]

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


class GRPOTokenLosses(NamedTuple):
    """Per-token outputs, all (B, T); 0 (False) where mask is 0."""

    token_losses: Tensor
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * KL_k3: what is minimised."""
    ratio: Tensor
    """r = pi / pi_old, detached."""
    clipped_low: Tensor
    """bool: A < 0 and r < 1 - eps_low (the clip removes the gradient)."""
    clipped_high: Tensor
    """bool: A > 0 and r > 1 + eps_high."""
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
) -> GRPOTokenLosses:
    """The clipped surrogate with one advantage per completion, plus an optional KL term.

    logprobs: (B, T) log pi of the completion tokens (carries the gradient); old_logprobs: (B, T)
    under the sampling policy; advantages: (B,), one per completion, broadcast over its tokens;
    mask: (B, T) 0/1; ref_logprobs: (B, T) under the frozen reference, for beta > 0.
    Per token: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) (see `ppo_policy_loss`),
    plus beta * (exp(ref - logp) - (ref - logp) - 1), the k3 estimator (>= 0, gradient 0 where
    pi == pi_ref), as in GRPO's paper. Unreduced: aggregate with `grpo_loss_terms`.
    """
    per_token = advantages.detach()[:, None].expand_as(logprobs)
    policy = ppo_policy_loss(
        logprobs, old_logprobs, per_token, mask, clip_ratio=epsilon_low, clip_ratio_high=epsilon_high
    )
    token_losses, kl = policy.token_losses, None
    keep = mask.to(torch.bool)
    if ref_logprobs is not None:
        kl = torch.where(keep, kl_penalty(logprobs, ref_logprobs.detach(), estimator="k3"), torch.zeros_like(logprobs))
        token_losses = token_losses + beta * kl
    return GRPOTokenLosses(
        token_losses=token_losses,
        ratio=policy.ratio,
        clipped_low=policy.clipped & (per_token < 0),
        clipped_high=policy.clipped & (per_token > 0),
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
    if loss_type == "grpo":
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
