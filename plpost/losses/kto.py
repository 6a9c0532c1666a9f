"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024): preference tuning from unpaired feedback.

Each example is one completion labelled desirable or undesirable. Its implicit reward is the
log-ratio r = log pi(y|x) - log pi_ref(y|x); the loss compares it with a reference point z0,
an estimate of KL(pi || pi_ref) from mismatched (prompt, completion) pairs, the same formula as
TRL 1.16's KTOTrainer with loss_type="kto" (`trl/trainer/kto_trainer.py`, `_compute_loss`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["KTOLoss", "kto_loss", "kto_reference_point"]


class KTOLoss(NamedTuple):
    """Per-example KTO outputs, all (N,)."""

    losses: Tensor
    """The weighted loss of each example; the caller reduces (sum over the step / its examples)."""
    rewards: Tensor
    """beta * (policy - reference) log-ratio of each completion, summed over its tokens, detached."""


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """Per-example KTO loss (Eq. 7 of the paper, as TRL 1.16 computes it).

    policy_logps, ref_logps: (N,) log pi(y|x) summed over each completion's tokens; desirable:
    (N,) bool labels; reference_point: scalar z0 (see `kto_reference_point`), detached.
    With r = policy_logps - ref_logps:
      desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
      undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))
    The paper (and TRL's docs) suggest weights with
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3].
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not weight >= 0:
            raise ValueError(f"{name} must be >= 0, got {weight}")
    log_ratio = policy_logps - ref_logps
    z0 = reference_point.detach()
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio))),
    )
    return KTOLoss(losses, (beta * log_ratio).detach())


def kto_reference_point(log_ratio_sum: Tensor, count: Tensor) -> Tensor:
    """z0 = max(0, mean of log pi(y'|x) - log pi_ref(y'|x)) over mismatched pairs (x, y'), detached.

    log_ratio_sum: the summed log-ratios of the mismatched pairs; count: how many there are.
    Given as a sum and a count so that callers can add them over devices first (the mean of
    all pairs, not a mean of per-device means). No pair (count 0) gives 0, the bound the clamp
    enforces anyway: the reference point is then the reference model's own.
    """
    mean = log_ratio_sum.detach() / count.clamp(min=1).to(log_ratio_sum.dtype)
    return mean.clamp(min=0)
