"""Reductions over the unmasked elements of a tensor.

Every function here selects with `torch.where`, never multiplies by the mask: a padded position
may hold NaN or inf (a log-prob of a pad token, a value head on garbage), and `nan * 0` is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _select(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcast `values` and a bool copy of `mask`; zero the masked-out entries of `values`."""
    values, keep = torch.broadcast_tensors(values, mask.to(torch.bool))
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)), keep


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `values` where `mask` is 1.

    values, mask: broadcastable, e.g. both (batch, time); mask is 0/1 (bool or float).
    dim: None sums everything to a scalar; an int sums that dimension away.
    Positions with mask 0 contribute nothing, whatever they hold (NaN and inf included).
    An all-masked slice sums to 0.
    """
    filled, _ = _select(values, mask)
    return filled.sum() if dim is None else filled.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1.

    values, mask: broadcastable, e.g. both (batch, time); mask is 0/1 (bool or float).
    dim: None averages over every unmasked element (a scalar); an int averages that dimension.
    Positions with mask 0 contribute nothing, whatever they hold (NaN included).
    Raises ValueError when a reduced slice has no unmasked element, rather than returning NaN
    (the check reads the counts, so it synchronises with the device).
    """
    filled, keep = _select(values, mask)
    count = keep.sum() if dim is None else keep.sum(dim)
    if bool((count == 0).any()):
        raise ValueError("masked_mean: a reduced slice has no unmasked element (mask is all 0 there)")
    total = filled.sum() if dim is None else filled.sum(dim)
    return total / count.to(total.dtype)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of all unmasked elements of `values` (one global scalar, as in PPO whitening).

    values, mask: broadcastable; mask is 0/1 (bool or float).
    Normalisation: sum of squared deviations from the masked mean, divided by n - 1 when
    `unbiased` (Bessel's correction, as TRL and torch.var do) or by n otherwise, where n is the
    number of unmasked elements. Raises ValueError when n == 0, or n == 1 with `unbiased`.
    """
    _, keep = _select(values, mask)
    n = int(keep.sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(
            f"masked_var: {n} unmasked element(s); need at least {2 if unbiased else 1}"
            + (" for the unbiased estimate" if unbiased else "")
        )
    mean = masked_mean(values, keep)
    return masked_sum((values - mean) ** 2, keep) / (n - 1 if unbiased else n)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten `values` with the mean and (unbiased) variance of all its unmasked elements.

    values, mask: broadcastable, e.g. (batch, time) advantages and the response mask.
    Returns (values - mean) / sqrt(var + eps), plus `mean` again when `shift_mean` is False
    (rescale only, keep the location). Statistics are global over every unmasked element, not
    per row. Masked positions of the output are 0. Raises ValueError with fewer than two
    unmasked elements (see masked_var).
    """
    _, keep = _select(values, mask)
    mean = masked_mean(values, keep)
    var = masked_var(values, keep, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))
