"""Direct preference optimisation and its variants (cDPO, robust DPO, SLiC hinge, IPO, SimPO).

Definitions match TRL's `DPOTrainer.dpo_loss` (sigmoid, robust, hinge, ipo) and `CPOTrainer`
(simpo) numerically; each formula is written out in `dpo_loss`'s docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DPO_LOSS_TYPES", "DPOLoss", "dpo_loss", "chosen_nll"]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "hinge", "ipo", "simpo")


class DPOLoss(NamedTuple):
    """Per-pair DPO outputs, all (N,)."""

    losses: Tensor
    """The loss of each pair; the caller reduces (mean over pairs)."""
    chosen_rewards: Tensor
    """Implicit reward of the chosen completion, detached (see `dpo_loss` for each loss type)."""
    rejected_rewards: Tensor
    """Implicit reward of the rejected completion, detached."""


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> DPOLoss:
    """Per-pair preference loss from sequence log-probabilities.

    All log-prob inputs are (N,) log pi(y|x) SUMMED over the completion tokens (prompt excluded);
    pc, pr = policy chosen/rejected, rc, rr = reference chosen/rejected. chosen_lengths and
    rejected_lengths: (N,) positive completion token counts, needed by "ipo" and "simpo".
    beta > 0; label_smoothing (ls) is the assumed fraction of flipped labels, in [0, 0.5].

    With z = (pc - rc) - (pr - rr), the log-ratio margin of the pair:
      - "sigmoid" (DPO; cDPO when ls > 0):
            -logsigmoid(beta*z) * (1 - ls) - logsigmoid(-beta*z) * ls
      - "robust" (Chowdhury et al. 2024, unbiased under label noise; ls < 0.5):
            (-logsigmoid(beta*z) * (1 - ls) + logsigmoid(-beta*z) * ls) / (1 - 2*ls)
      - "hinge" (SLiC):  relu(1 - beta*z)
      - "ipo" (Azar et al. 2023): (z_norm - 1/(2*beta))^2, where z_norm is z with every log-prob
            divided by its completion length (TRL averages log-probs for IPO).
      - "simpo" (Meng et al. 2024), reference-free (ref_* may be None):
            z = pc/len_c - pr/len_r,  u = beta*z - simpo_gamma,
            -logsigmoid(u) * (1 - ls) - logsigmoid(-u) * ls.
        `simpo_gamma` is the target reward margin gamma itself, as TRL's CPOConfig.simpo_gamma.
        The SimPO paper's code and configs give gamma_beta_ratio instead:
        simpo_gamma = gamma_beta_ratio * beta (beta=2.0, gamma_beta_ratio=0.5 -> simpo_gamma=1.0).
    "hinge" and "ipo" take no label smoothing (ValueError if ls != 0) rather than ignoring it.

    Rewards (detached, for logging): beta * (policy - reference) log-ratio of each completion,
    on the same scale as the loss: summed log-probs for sigmoid/robust/hinge, length-normalised
    for "ipo" (as TRL), and beta * length-normalised policy log-prob for "simpo" (no reference).
    Raises ValueError for an unknown loss_type (listing DPO_LOSS_TYPES) or a missing input.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ls = float(label_smoothing)
    if loss_type in ("hinge", "ipo") and ls != 0.0:
        raise ValueError(f"loss_type={loss_type!r} takes no label_smoothing (got {ls}); use 'sigmoid' or 'robust'")
    if loss_type == "robust" and not 0.0 <= ls < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust', got {ls}")
    if not 0.0 <= ls <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {ls}")
    if loss_type in ("ipo", "simpo") and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths (completion token counts)")
    if loss_type != "simpo" and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")

    if loss_type == "simpo":
        chosen = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
        rejected = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)
        u = beta * (chosen - rejected) - simpo_gamma
        losses = -F.logsigmoid(u) * (1 - ls) - F.logsigmoid(-u) * ls
        return DPOLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        chosen_ratio = chosen_ratio / chosen_lengths.to(chosen_ratio.dtype)
        rejected_ratio = rejected_ratio / rejected_lengths.to(rejected_ratio.dtype)
    z = chosen_ratio - rejected_ratio

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z) * (1 - ls) - F.logsigmoid(-beta * z) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * z) * (1 - ls) + F.logsigmoid(-beta * z) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:  # ipo
        losses = (z - 1 / (2 * beta)) ** 2
    return DPOLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token negative log-likelihood of each chosen completion, shape (N,).

    policy_chosen_logps: (N,) summed log-probs; chosen_lengths: (N,) positive token counts.
    Returns -logps / length: the RPO term (Pang et al. 2024) that the DPO module adds, scaled by
    its coefficient, to keep the chosen completions likely.
    """
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
