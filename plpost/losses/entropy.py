"""Entropy-aware policy updates: train only the high-entropy ("forking") tokens, and an entropy
bonus that keeps the policy from collapsing.

entropies, mask: (B, T) over completion tokens; entropies are those of the full next-token
distribution (`plpost.losses.token_entropy`), not the -log pi of the sampled token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plpost.losses.grpo import LossTerms
from plpost.losses.masked import masked_sum

__all__ = ["entropy_bonus_terms", "entropy_threshold", "top_entropy_mask"]


def entropy_threshold(entropies: Tensor, mask: Tensor, *, quantile: float) -> Tensor:
    """tau_rho: the (1 - rho)-quantile (torch.quantile's linear interpolation, as TRL) of the
    entropies where mask is 1, rho = `quantile`. Scalar; +inf when no token is unmasked (nothing
    is kept). Computed over every token of the batch given: a stage passes the whole generation
    batch, of every device, so the threshold does not depend on the micro-batch split."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {quantile}")
    # float32 at least (torch.quantile takes no half types), float64 kept: the threshold is compared
    # with the entropies themselves, and a rounded one would drop the tokens equal to it.
    values = entropies.detach()[mask.to(torch.bool)].to(torch.promote_types(entropies.dtype, torch.float32))
    if values.numel() == 0:
        return torch.full((), torch.inf, device=entropies.device)
    return torch.quantile(values, 1.0 - quantile)


def top_entropy_mask(entropies: Tensor, mask: Tensor, *, quantile: float, threshold: Tensor | None = None) -> Tensor:
    """(B, T) bool: the unmasked tokens whose entropy is at least tau_rho (`entropy_threshold`).

    The objective of "Beyond the 80/20 rule" (Wang et al. 2025, arXiv 2506.01939): the policy
    loss keeps the indicator 1[H_t >= tau_rho^B], tau_rho^B the top-rho entropy quantile of the
    batch B, so only about the rho most uncertain tokens get a policy gradient (the paper: rho
    = 0.2). rho = 1 keeps every token; rho = 0 keeps the highest-entropy token(s) only. Ties at
    the threshold are kept. threshold: a tau computed elsewhere (e.g. over several devices).
    """
    if threshold is None:
        threshold = entropy_threshold(entropies, mask, quantile=quantile)
    return (entropies.detach() >= threshold) & mask.to(torch.bool)


def entropy_bonus_terms(entropies: Tensor, mask: Tensor) -> LossTerms:
    """The entropy bonus's share of a loss, minimised as loss + coef * numerator / denominator:
    numerator = -sum_t H_t over the tokens where mask is 1 (with the gradient of H), denominator
    = those tokens. Summed over an optimizer step's micro-batches (and devices) it is minus the
    mean token entropy, -H, the bonus of L = L_policy - coef * H (TRL's `entropy_coef`), whatever
    the split; TRL averages each micro-batch on its own instead.
    """
    keep = mask.to(torch.bool)
    return LossTerms(-masked_sum(entropies, keep), keep.sum().float())
