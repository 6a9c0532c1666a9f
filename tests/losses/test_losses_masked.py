"""Tests for plpost.losses.masked: hand-computed sums/means/variances, NaN-safety, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plpost.losses import masked_mean, masked_sum, masked_var, masked_whiten

F64 = torch.float64
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0], [0, 1, 0]])


def test_sum_and_mean_by_hand():
    """Unmasked elements are 1, 2 (row 0) and 5 (row 1): total 8 over 3 elements; per row the
    sums are 3 and 5 over 2 and 1 elements, so the row means are 1.5 and 5."""
    torch.testing.assert_close(masked_sum(VALUES, MASK), torch.tensor(8.0, dtype=F64))
    torch.testing.assert_close(masked_sum(VALUES, MASK, dim=1), torch.tensor([3.0, 5.0], dtype=F64))
    torch.testing.assert_close(masked_mean(VALUES, MASK), torch.tensor(8.0 / 3.0, dtype=F64))
    torch.testing.assert_close(masked_mean(VALUES, MASK, dim=1), torch.tensor([1.5, 5.0], dtype=F64))


def test_bool_and_float_masks_agree():
    """A 0/1 mask means the same thing as bool, float or int."""
    for mask in (MASK.bool(), MASK.to(F64), MASK.float()):
        torch.testing.assert_close(masked_mean(VALUES, mask, dim=1), torch.tensor([1.5, 5.0], dtype=F64))


def test_masked_positions_may_hold_nan_and_inf():
    """nan * 0 is NaN, so a multiplicative mask would poison the result; selection does not.
    The gradient of the unmasked elements is 1/3 each (mean of 3), and 0 (not NaN) elsewhere."""
    values = VALUES.clone()
    values[0, 2] = float("nan")
    values[1, 0] = float("inf")
    values[1, 2] = -float("inf")
    values.requires_grad_(True)
    out = masked_mean(values, MASK)
    torch.testing.assert_close(out, torch.tensor(8.0 / 3.0, dtype=F64))
    (grad,) = torch.autograd.grad(out, values)
    torch.testing.assert_close(grad, MASK.to(F64) / 3.0)
    assert torch.isfinite(masked_sum(values, MASK, dim=1)).all()
    torch.testing.assert_close(masked_var(values.detach(), MASK), masked_var(VALUES, MASK))
    whitened = masked_whiten(values.detach(), MASK)
    assert torch.isfinite(whitened).all()
    torch.testing.assert_close(whitened, masked_whiten(VALUES, MASK))


def test_mean_of_empty_slice_raises():
    """Row 2 has no unmasked element: its mean is undefined, and that is an error, not NaN."""
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="no unmasked element"):
        masked_mean(VALUES, mask, dim=1)
    with pytest.raises(ValueError):
        masked_mean(VALUES, torch.zeros_like(mask))
    torch.testing.assert_close(masked_sum(VALUES, mask, dim=1), torch.tensor([1.0, 0.0], dtype=F64))


def test_var_by_hand():
    """Unmasked 1, 2, 3 (4 is masked): mean 2, squared deviations 1 + 0 + 1 = 2,
    so the unbiased variance is 2 / (3 - 1) = 1 and the biased one 2 / 3."""
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    mask = torch.tensor([1, 1, 1, 0])
    torch.testing.assert_close(masked_var(values, mask), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), torch.tensor(2.0 / 3.0, dtype=F64))


def test_var_needs_enough_elements():
    """One element has no unbiased variance (n - 1 = 0); zero elements have none at all."""
    values = torch.tensor([1.0, 2.0], dtype=F64)
    with pytest.raises(ValueError):
        masked_var(values, torch.tensor([1, 0]))
    torch.testing.assert_close(masked_var(values, torch.tensor([1, 0]), unbiased=False), torch.tensor(0.0, dtype=F64))
    with pytest.raises(ValueError):
        masked_var(values, torch.tensor([0, 0]), unbiased=False)


def test_whiten_by_hand_and_global():
    """Row 0 holds 1, 2, 3 and row 1 holds 5 (masked: 4, 6). Statistics are global over the four
    unmasked values: mean 11/4, unbiased variance ((1.75)^2 + (0.75)^2 + (0.25)^2 + (2.25)^2)/3
    = 35/12. A per-row whitening would instead map row 1's single value to 0."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [0, 1, 0]])
    mean, var = 11.0 / 4.0, 35.0 / 12.0
    expected = (values - mean) / math.sqrt(var + 1e-8) * mask
    torch.testing.assert_close(masked_whiten(values, mask), expected)
    kept = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept, (expected + mean) * mask)
    out = masked_whiten(values, mask)
    torch.testing.assert_close(masked_mean(out, mask), torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(masked_var(out, mask), torch.tensor(var / (var + 1e-8), dtype=F64))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-1e3, 1e3), st.booleans()), min_size=2, max_size=30).filter(
        lambda xs: sum(keep for _, keep in xs) >= 2
    )
)
def test_against_boolean_indexing(pairs):
    """masked_* over a mask equals the plain reduction of values[mask]."""
    values = torch.tensor([v for v, _ in pairs], dtype=F64)
    mask = torch.tensor([k for _, k in pairs])
    kept = values[mask]
    torch.testing.assert_close(masked_sum(values, mask), kept.sum())
    torch.testing.assert_close(masked_mean(values, mask), kept.mean())
    torch.testing.assert_close(masked_var(values, mask), kept.var())
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), kept.var(unbiased=False))
