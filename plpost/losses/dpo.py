"""Direct preference optimisation and its variants (cDPO, robust DPO, SLiC hinge, IPO, SimPO, ORPO).

Each formula is written out in `dpo_loss`'s docstring, with how it maps to TRL 1.16: its
`DPOTrainer` (sigmoid, robust, hinge, ipo), `CPOTrainer` (simpo) and `experimental.orpo.ORPOTrainer`
(orpo) compute the same per-pair losses, except cDPO (below).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DPO_LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES", "DPOLoss", "dpo_loss", "chosen_nll", "log1mexp"]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")
REFERENCE_FREE_LOSS_TYPES: tuple[str, ...] = ("simpo", "orpo")


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
    rejected_lengths: (N,) positive completion token counts, needed by "ipo", "simpo" and "orpo".
    beta > 0; label_smoothing (ls) is the assumed fraction of flipped labels, in [0, 0.5].

    With z = (pc - rc) - (pr - rr), the log-ratio margin of the pair:
      - "sigmoid" (DPO; cDPO when ls > 0):
            -logsigmoid(beta*z) * (1 - ls) - logsigmoid(-beta*z) * ls
        TRL 1.16's "sigmoid" is -logsigmoid(beta*z) whatever its label_smoothing, so the two agree
        only at ls = 0; TRL 1.16 has no cDPO (its label_smoothing reaches "robust", "exo_pair"
        and "aot" only). The cDPO form is that of Mitchell's note and of TRL before 1.0.
      - "robust" (Chowdhury et al. 2024, unbiased under label noise; ls < 0.5), as TRL's "robust":
            (-logsigmoid(beta*z) * (1 - ls) + logsigmoid(-beta*z) * ls) / (1 - 2*ls)
      - "hinge" (SLiC), as TRL's "hinge":  relu(1 - beta*z)
      - "ipo" (Azar et al. 2023), as TRL's "ipo": (z_norm - 1/(2*beta))^2, where z_norm is z with
            every log-prob divided by its completion length.
      - "simpo" (Meng et al. 2024), reference-free (ref_* may be None), as TRL's CPOTrainer
        with loss_type="simpo", cpo_alpha=0:
            z = pc/len_c - pr/len_r,  u = beta*z - simpo_gamma,
            -logsigmoid(u) * (1 - ls) - logsigmoid(-u) * ls.
        `simpo_gamma` is the target reward margin gamma itself, as TRL's CPOConfig.simpo_gamma.
        The SimPO paper's code and configs give gamma_beta_ratio instead:
        simpo_gamma = gamma_beta_ratio * beta (beta=2.0, gamma_beta_ratio=0.5 -> simpo_gamma=1.0).
      - "orpo" (Hong et al. 2024), reference-free, the odds-ratio term only: with the
        length-averaged log-probs c = pc/len_c, r = pr/len_r (log P of the paper, Eq. 4-7),
            log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r)),   beta * -logsigmoid(log_odds).
        beta is the paper's lambda (TRL's ORPOConfig.beta, default 0.1). The NLL of the chosen
        answer, ORPO's other term, is added by the module (see `chosen_nll`). An average
        log-prob above -1e-6 (a completion of probability ~1) is read as -1e-6, so log(1 - e^c)
        stays finite.
    "hinge", "ipo" and "orpo" take no label smoothing (ValueError if ls != 0) rather than
    ignoring it.

    Rewards (detached, for logging): beta * (policy - reference) log-ratio of each completion,
    summed over its tokens, for every reference-based loss type ("ipo" included: the loss is
    length-normalised, the logged reward is not, as TRL 1.16 logs it); for "simpo" and "orpo",
    which have no reference, beta * the length-averaged policy log-prob (as TRL's CPO and ORPO).
    Raises ValueError for an unknown loss_type (listing DPO_LOSS_TYPES) or a missing input.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ls = float(label_smoothing)
    if loss_type in ("hinge", "ipo", "orpo") and ls != 0.0:
        raise ValueError(f"loss_type={loss_type!r} takes no label_smoothing (got {ls}); use 'sigmoid' or 'robust'")
    if loss_type == "robust" and not 0.0 <= ls < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust', got {ls}")
    if not 0.0 <= ls <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {ls}")
    if loss_type in ("ipo", *REFERENCE_FREE_LOSS_TYPES) and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths (completion token counts)")
    if loss_type not in REFERENCE_FREE_LOSS_TYPES and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")

    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        chosen = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
        rejected = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)
        if loss_type == "simpo":
            u = beta * (chosen - rejected) - simpo_gamma
            losses = -F.logsigmoid(u) * (1 - ls) - F.logsigmoid(-u) * ls
        else:
            chosen, rejected = chosen.clamp(max=-1e-6), rejected.clamp(max=-1e-6)
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            losses = -beta * F.logsigmoid(log_odds)
        return DPOLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    z = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        z = chosen_ratio / chosen_lengths.to(z.dtype) - rejected_ratio / rejected_lengths.to(z.dtype)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z) * (1 - ls) - F.logsigmoid(-beta * z) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * z) * (1 - ls) + F.logsigmoid(-beta * z) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:  # ipo
        losses = (z - 1 / (2 * beta)) ** 2
    return DPOLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -ln 2 (Maechler 2012): log(-expm1(x)) near
    0, where 1 - e^x cancels, and log1p(-e^x) below, where e^x is small."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token negative log-likelihood of each chosen completion, shape (N,).

    policy_chosen_logps: (N,) summed log-probs; chosen_lengths: (N,) positive token counts.
    Returns -logps / length: the NLL term of RPO (Pang et al. 2024 divide each pair's NLL by its
    own length, prompt tokens included) and of ORPO, which the DPO module adds per pair or per
    token of the step (its `nll_normalization`).
    """
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
