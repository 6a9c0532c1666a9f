"""Tests for plpost.losses.ppo: KL estimators, clipped policy/value losses, adaptive KL, EV."""

import math

import pytest
import torch

from plpost.losses import (
    KL_ESTIMATORS,
    adaptive_kl_coefficient,
    clipped_value_loss,
    explained_variance,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
)

F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------- KL penalty


def test_kl_estimators_by_hand():
    """d = logp - ref = ln 2: k1 = ln 2; k3 = e^-d + d - 1 = 1/2 + ln 2 - 1; abs = ln 2; mse = ln(2)^2 / 2.
    With d = -ln 2: k1 = -ln 2, k3 = 2 - ln 2 - 1."""
    ln2 = math.log(2.0)
    logp, ref = t([ln2, -ln2]), t([0.0, 0.0])
    torch.testing.assert_close(kl_penalty(logp, ref), t([ln2, -ln2]))
    torch.testing.assert_close(kl_penalty(logp, ref, estimator="k3"), t([0.5 + ln2 - 1, 1 - ln2]))
    torch.testing.assert_close(kl_penalty(logp, ref, estimator="abs"), t([ln2, ln2]))
    torch.testing.assert_close(kl_penalty(logp, ref, estimator="mse"), t([0.5 * ln2**2, 0.5 * ln2**2]))


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_is_zero_when_policy_equals_reference(estimator):
    logp = -torch.rand(3, 5, dtype=F64) * 10
    torch.testing.assert_close(kl_penalty(logp, logp.clone(), estimator=estimator), torch.zeros(3, 5, dtype=F64))


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    """For a token drawn from p, E_p[k1] = sum p (log p - log q) = KL(p||q) and
    E_p[k3] = sum p (q/p - log(q/p) - 1) = sum q - 1 + KL = KL. Taking the expectation exactly
    over a 6-token vocabulary checks both; k3 >= 0 since e^x >= 1 + x, in floating point too."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=F64) * 2, -1)
    logq = torch.log_softmax(torch.randn(6, generator=g, dtype=F64) * 2, -1)
    kl = (logp.exp() * (logp - logq)).sum()
    for estimator in ("k1", "k3"):
        torch.testing.assert_close((logp.exp() * kl_penalty(logp, logq, estimator=estimator)).sum(), kl)
    # Wide log-ratios, and tiny ones where exp(x) - x - 1 would round below 0 (hence expm1).
    g = torch.Generator().manual_seed(1)
    for d in (torch.linspace(-30, 30, 601, dtype=F64), torch.randn(10_000, generator=g, dtype=F64) * 1e-8):
        for dtype in (F64, torch.float32):
            assert (kl_penalty(d.to(dtype), torch.zeros_like(d, dtype=dtype), estimator="k3") >= 0).all()


def test_k3_finite_for_extreme_log_ratios():
    """ref - logp = 1e4 would overflow exp; it is clamped to 20, giving e^20 - 21 with zero slope."""
    logp = t([-1e4, 1e4]).requires_grad_(True)
    out = kl_penalty(logp, torch.zeros(2, dtype=F64), estimator="k3")
    (grad,) = torch.autograd.grad(out.sum(), logp)
    torch.testing.assert_close(out, t([math.exp(20) - 21, math.exp(-20) + 19]))
    assert torch.isfinite(grad).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k3, abs, mse"):
        kl_penalty(torch.zeros(1), torch.zeros(1), estimator="k2")


# ---------------------------------------------------------------- policy loss


def reference_policy_loss(logp, old, adv, mask, eps):
    """Element by element in python floats."""
    out = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            if mask[i, j]:
                r = math.exp(float(logp[i, j] - old[i, j]))
                a = float(adv[i, j])
                out[i, j] = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
    return out


def test_policy_loss_by_hand():
    """eps = 0.2. r = 1.5, A = 1: max(-1.5, -1.2) = -1.2, clipped (no gradient).
    r = 1.5, A = -1: max(1.5, 1.2) = 1.5, unclipped, gradient -A r = 1.5.
    r = 0.5, A = 1: max(-0.5, -0.8) = -0.5, unclipped, gradient -0.5.
    r = 0.5, A = -1: max(0.5, 0.8) = 0.8, clipped (no gradient)."""
    logp = t([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]).requires_grad_(True)
    old = torch.zeros(1, 4, dtype=F64)
    adv = t([1.0, -1.0, 1.0, -1.0])
    out = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_ratio=0.2)
    torch.testing.assert_close(out.token_losses, t([-1.2, 1.5, -0.5, 0.8]))
    torch.testing.assert_close(out.ratio, t([1.5, 1.5, 0.5, 0.5]))
    assert out.clipped.tolist() == [[True, False, False, True]]
    torch.testing.assert_close(
        out.approx_kl, 0.5 * t([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]) ** 2
    )
    (grad,) = torch.autograd.grad(out.token_losses.sum(), logp)
    torch.testing.assert_close(grad, t([0.0, 1.5, -0.5, 0.0]))


def test_policy_loss_against_reference():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 6, generator=g, dtype=F64) * 3
    old = logp + torch.randn(3, 6, generator=g, dtype=F64) * 0.3
    adv = torch.randn(3, 6, generator=g, dtype=F64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = ppo_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    torch.testing.assert_close(out.token_losses, reference_policy_loss(logp, old, adv, mask, 0.2))


def test_on_policy_step_has_ratio_one_and_vanilla_gradient():
    """First PPO epoch: logprobs == old_logprobs, so r = 1, nothing is clipped, and the loss is
    -A per token. Reduced by a masked mean over n = 5 valid tokens, d loss / d logp_t = -A_t / 5
    on valid tokens (the policy-gradient estimator) and 0 on padding."""
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(2, 4, generator=g, dtype=F64)).requires_grad_(True)
    adv = torch.randn(2, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = ppo_policy_loss(logp, logp.detach(), adv, mask, clip_ratio=0.2)
    torch.testing.assert_close(out.ratio, mask.to(F64))
    assert not out.clipped.any()
    torch.testing.assert_close(out.approx_kl, torch.zeros(2, 4, dtype=F64))
    (grad,) = torch.autograd.grad(masked_mean(out.token_losses, mask), logp)
    torch.testing.assert_close(grad, -adv * mask / 5)


def test_policy_loss_extreme_log_ratios_and_nan_padding():
    """Log-ratios of +-1e4 are clamped to +-20 before exp: finite loss and gradient. NaN in padded
    positions never reaches an output or a gradient."""
    logp = t([1e4, -1e4, 1e4, -1e4, float("nan")]).requires_grad_(True)
    old = torch.zeros(1, 5, dtype=F64)
    adv = t([-1.0, -1.0, 1.0, 1.0, float("nan")])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = ppo_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    (grad,) = torch.autograd.grad(out.token_losses.sum(), logp)
    for x in (out.token_losses, out.ratio, out.approx_kl, grad):
        assert torch.isfinite(x).all()
    torch.testing.assert_close(out.token_losses[0, 0], torch.tensor(math.exp(20), dtype=F64))
    assert grad[0, 4] == 0


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    """clip 0.5, old 0. v = 1, R = 2: clipped v = 0.5, errors 1 and 2.25: loss 1.125, clipped, and
    the gradient through v is 0. v = 1, R = 0: errors 1 and 0.25: loss 0.5, gradient v - R = 1.
    v = 0.2, R = 1 (inside the clip range): 0.5 * 0.64 = 0.32, gradient -0.8."""
    values = t([1.0, 1.0, 0.2]).requires_grad_(True)
    out = clipped_value_loss(values, torch.zeros(1, 3, dtype=F64), t([2.0, 0.0, 1.0]), torch.ones(1, 3), clip_range=0.5)
    torch.testing.assert_close(out.token_losses, t([1.125, 0.5, 0.32]))
    assert out.clipped.tolist() == [[True, False, False]]
    (grad,) = torch.autograd.grad(out.token_losses.sum(), values)
    torch.testing.assert_close(grad, t([0.0, 1.0, -0.8]))


def test_value_loss_against_reference_and_mask():
    g = torch.Generator().manual_seed(3)
    v, old, ret = (torch.randn(2, 5, generator=g, dtype=F64) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    old[1, 3] = float("nan")
    out = clipped_value_loss(v, old, ret, mask, clip_range=0.2)
    ref = torch.zeros(2, 5, dtype=F64)
    for i in range(2):
        for j in range(5):
            if mask[i, j]:
                vc = float(old[i, j]) + min(max(float(v[i, j] - old[i, j]), -0.2), 0.2)
                ref[i, j] = 0.5 * max(float(v[i, j] - ret[i, j]) ** 2, (vc - float(ret[i, j])) ** 2)
    torch.testing.assert_close(out.token_losses, ref)


# ---------------------------------------------------------------- adaptive KL, explained variance


def test_adaptive_kl_coefficient_by_hand():
    """target 0.1, horizon 10000, 256 samples. KL 0.12: err = 0.2, coef * (1 + 0.2 * 0.0256).
    KL 1.0: err 9 is clipped to 0.2, same step. KL 0.05: err -0.5 clipped to -0.2: coef falls.
    KL on target: unchanged."""
    kw = dict(target=0.1, horizon=10_000, n_steps=256)
    up = adaptive_kl_coefficient(0.2, 0.12, **kw)
    assert up == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    assert adaptive_kl_coefficient(0.2, torch.tensor(1.0), **kw) == pytest.approx(up)
    down = adaptive_kl_coefficient(0.2, 0.05, **kw)
    assert down == pytest.approx(0.2 * (1 - 0.2 * 256 / 10_000))
    assert down < 0.2 < up
    assert adaptive_kl_coefficient(0.2, 0.1, **kw) == pytest.approx(0.2)


def test_explained_variance_by_hand():
    """R = (1, 2, 3), Var R = 2/3 (biased). V = R: 1. V = (1, 1, 1): R - V = (0, 1, 2), same variance: 0.
    V = (1, 2, 2): R - V = (0, 0, 1), variance 2/9, so 1 - (2/9) / (2/3) = 2/3.
    A NaN in a masked fourth position changes nothing; constant returns give NaN."""
    returns = t([1.0, 2.0, 3.0, float("nan")])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(explained_variance(t([1.0, 1.0, 1.0, 0.0]), returns, mask), torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(
        explained_variance(t([1.0, 2.0, 2.0, 0.0]), returns, mask), torch.tensor(2.0 / 3.0, dtype=F64)
    )
    assert torch.isnan(explained_variance(t([0.0, 1.0]), t([5.0, 5.0]), torch.ones(1, 2)))
