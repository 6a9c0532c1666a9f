"""Tests for plpost.losses.dpo: every loss type by hand, against a scalar reference, and properties."""

import math

import pytest
import torch

from plpost.losses import DPO_LOSS_TYPES, chosen_nll, dpo_loss

F64 = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=F64)


def log1pexp(x):
    """-log sigmoid(-x) = log(1 + e^x), in plain floats."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def reference_pair(pc, pr, rc, rr, lc, lr, beta, loss_type, ls, gamma):
    """One pair at a time, in python floats, written from TRL's formulas."""
    if loss_type == "simpo":
        u = beta * (pc / lc - pr / lr) - gamma
        return (1 - ls) * log1pexp(-u) + ls * log1pexp(u)
    if loss_type == "orpo":
        c, r = pc / lc, pr / lr
        log_odds = (c - math.log(-math.expm1(c))) - (r - math.log(-math.expm1(r)))
        return beta * log1pexp(-log_odds)
    if loss_type == "ipo":
        z = (pc - rc) / lc - (pr - rr) / lr
        return (z - 1 / (2 * beta)) ** 2
    z = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return (1 - ls) * log1pexp(-beta * z) + ls * log1pexp(beta * z)
    if loss_type == "robust":
        return ((1 - ls) * log1pexp(-beta * z) - ls * log1pexp(beta * z)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * z)
    raise AssertionError(loss_type)


def test_loss_is_log2_when_policy_equals_reference():
    """With pi == pi_ref every log-ratio is 0, so z = 0, -log(sigmoid(0)) = log 2 for every pair
    whatever beta is, and both implicit rewards are 0."""
    logps = torch.randn(5, dtype=F64)
    out = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.3)
    torch.testing.assert_close(out.losses, torch.full((5,), math.log(2), dtype=F64))
    torch.testing.assert_close(out.chosen_rewards, torch.zeros(5, dtype=F64))
    torch.testing.assert_close(out.rejected_rewards, torch.zeros(5, dtype=F64))


# pc = -1, pr = -3, rc = rr = -2: chosen log-ratio +1, rejected -1, z = 2; beta = 0.5 so beta z = 1.
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


def test_sigmoid_and_cdpo_by_hand():
    """beta z = 1: DPO loss ln(1 + e^-1); cDPO with ls = 0.1 is 0.9 ln(1 + e^-1) + 0.1 ln(1 + e).
    Rewards are beta times the log-ratios: 0.5 and -0.5."""
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    torch.testing.assert_close(out.losses, t(math.log(1 + math.exp(-1))))
    torch.testing.assert_close(out.chosen_rewards, t(0.5))
    torch.testing.assert_close(out.rejected_rewards, t(-0.5))
    cdpo = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(cdpo.losses, t(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e)))


def test_robust_by_hand():
    """ls = 0.1: (0.9 ln(1 + e^-1) - 0.1 ln(1 + e)) / 0.8."""
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    torch.testing.assert_close(out.losses, t((0.9 * math.log(1 + math.exp(-1)) - 0.1 * math.log(1 + math.e)) / 0.8))


def test_hinge_by_hand():
    """relu(1 - beta z): 0 at beta = 0.5 (beta z = 1, the margin is met), 0.5 at beta = 0.25."""
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge").losses, t(0.0))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="hinge").losses, t(0.5))


def test_ipo_by_hand():
    """Chosen: (pc - rc) / len = (-4 + 6) / 2 = 1; rejected: (-6 + 3) / 3 = -1; z_norm = 2.
    beta = 0.5 so the target 1/(2 beta) = 1 and the loss is (2 - 1)^2 = 1. Rewards use the same
    summed log-ratios, as TRL 1.16 logs them: 0.5 * 2 = 1 and 0.5 * -3 = -1.5."""
    out = dpo_loss(
        t(-4.0), t(-6.0), t(-6.0), t(-3.0), beta=0.5, loss_type="ipo", chosen_lengths=t(2.0), rejected_lengths=t(3.0)
    )
    torch.testing.assert_close(out.losses, t(1.0))
    torch.testing.assert_close(out.chosen_rewards, t(1.0))
    torch.testing.assert_close(out.rejected_rewards, t(-1.5))


def test_ipo_minimum_is_at_half_inverse_beta():
    """(z - 1/(2 beta))^2 is 0 with zero gradient at z = 1/(2 beta) = 2.5 (beta = 0.2), and positive
    on either side. Lengths 1 so z_norm = z; z is moved through the policy chosen log-prob."""
    beta = 0.2
    ones = torch.ones(3, dtype=F64)
    pc = t(2.5, 2.0, 3.0).requires_grad_(True)
    out = dpo_loss(
        pc, 0 * ones, 0 * ones, 0 * ones, beta=beta, loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones
    )
    (grad,) = torch.autograd.grad(out.losses.sum(), pc)
    torch.testing.assert_close(out.losses, t(0.0, 0.25, 0.25))
    torch.testing.assert_close(grad, t(0.0, -1.0, 1.0))


def test_simpo_by_hand_and_gamma_beta_ratio():
    """Length-normalised: chosen -4/2 = -2, rejected -9/3 = -3, z = 1. beta = 2, gamma = 1:
    u = 2 - 1 = 1, loss ln(1 + e^-1). Rewards are beta times the normalised log-probs: -4, -6.
    The SimPO paper's gamma_beta_ratio = 0.5 is gamma / beta: -logsigmoid(beta (z - 0.5)) is the same."""
    out = dpo_loss(
        t(-4.0),
        t(-9.0),
        None,
        None,
        beta=2.0,
        loss_type="simpo",
        chosen_lengths=t(2.0),
        rejected_lengths=t(3.0),
        simpo_gamma=1.0,
    )
    torch.testing.assert_close(out.losses, t(math.log(1 + math.exp(-1))))
    torch.testing.assert_close(out.losses, t(log1pexp(-2.0 * (1 - 0.5))))
    torch.testing.assert_close(out.chosen_rewards, t(-4.0))
    torch.testing.assert_close(out.rejected_rewards, t(-6.0))


@pytest.mark.parametrize(
    "loss_type, ls",
    [(lt, ls) for lt in DPO_LOSS_TYPES for ls in (0.0, 0.2) if not (ls and lt in ("hinge", "ipo", "orpo"))],
)
def test_against_scalar_reference(loss_type, ls):
    """Vectorised losses equal the per-pair float reference for random inputs (hinge, ipo and
    orpo take no label smoothing)."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(8, generator=g, dtype=F64) * 30 for _ in range(4))
    lc, lr = (torch.randint(1, 20, (8,), generator=g) for _ in range(2))
    beta, gamma = 0.3, 0.7
    out = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=ls,
        chosen_lengths=lc,
        rejected_lengths=lr,
        simpo_gamma=gamma,
    )
    ref = [
        reference_pair(*(float(x[i]) for x in (pc, pr, rc, rr, lc, lr)), beta, loss_type, ls, gamma) for i in range(8)
    ]
    torch.testing.assert_close(out.losses, torch.tensor(ref, dtype=F64))


def test_zero_label_smoothing_reduces_cdpo_and_robust_to_dpo():
    """At ls = 0 the cDPO and robust formulas both collapse to -logsigmoid(beta z)."""
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(6, generator=g, dtype=F64) * 5 for _ in range(4)]
    z = (args[0] - args[2]) - (args[1] - args[3])
    plain = -torch.nn.functional.logsigmoid(0.1 * z)
    torch.testing.assert_close(dpo_loss(*args, beta=0.1, label_smoothing=0.0).losses, plain)
    torch.testing.assert_close(dpo_loss(*args, beta=0.1, loss_type="robust").losses, plain)


def test_sigmoid_gradient_by_hand():
    """d/d pc of -logsigmoid(beta z) is -beta sigmoid(-beta z): -beta/2 at z = 0; the reference
    log-probs and the rewards carry no gradient."""
    pc = torch.zeros(2, dtype=F64, requires_grad=True)
    ref = torch.zeros(2, dtype=F64, requires_grad=True)
    out = dpo_loss(pc, torch.zeros(2, dtype=F64), ref, torch.zeros(2, dtype=F64), beta=0.4)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    (grad,) = torch.autograd.grad(out.losses.sum(), pc, retain_graph=True)
    torch.testing.assert_close(grad, torch.full((2,), -0.2, dtype=F64))


@pytest.mark.parametrize("loss_type", [lt for lt in DPO_LOSS_TYPES if lt != "orpo"])
def test_extreme_log_ratios_are_finite(loss_type):
    """z = +-1e4 (a policy far from its reference) gives finite losses and gradients."""
    pc = t(1e4, -1e4).requires_grad_(True)
    zeros, ones = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    ls = 0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0
    out = dpo_loss(
        pc,
        zeros,
        zeros,
        zeros,
        beta=0.1,
        loss_type=loss_type,
        label_smoothing=ls,
        chosen_lengths=ones,
        rejected_lengths=ones,
    )
    (grad,) = torch.autograd.grad(out.losses.sum(), pc)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()


def test_errors_name_what_to_fix():
    x = t(-1.0)
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo, simpo, orpo"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, None, None, beta=0.1, loss_type="simpo")
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(x, x, None, None, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, None, None, beta=0.1, loss_type="orpo", label_smoothing=0.1, chosen_lengths=x, rejected_lengths=x)


def test_chosen_nll_by_hand():
    """-(-6) / 3 = 2 nats per token, and -(-1) / 4 = 0.25."""
    torch.testing.assert_close(chosen_nll(t(-6.0, -1.0), torch.tensor([3, 4])), t(2.0, 0.25))


def test_orpo_by_hand():
    """Average log-probs -ln 2 (chosen, 2 tokens summing to -2 ln 2) and -ln 4 (rejected, 3 tokens):
    P = 1/2 and 1/4, odds 1 and 1/3, log odds ratio ln 3, and beta * -log sigmoid(ln 3) =
    beta * ln(4/3). Rewards are beta times the average log-probs."""
    beta = 0.1
    out = dpo_loss(t(-2 * math.log(2)), t(-3 * math.log(4)), None, None, beta=beta, loss_type="orpo",
                   chosen_lengths=t(2.0), rejected_lengths=t(3.0))
    torch.testing.assert_close(out.losses, t(beta * math.log(4 / 3)))
    torch.testing.assert_close(out.chosen_rewards, t(-beta * math.log(2)))
    torch.testing.assert_close(out.rejected_rewards, t(-beta * math.log(4)))


def test_orpo_equals_trls_odds_ratio_loss():
    """TRL 1.16's `ORPOTrainer.odds_ratio_loss` (trl/experimental/orpo), called itself: it returns
    beta * logsigmoid(log_odds), which its loss subtracts (`policy_nll_loss - losses.mean()`), so
    plpost's per-pair losses are its losses negated, and the rewards are its rewards. It reads
    only `self.beta` and `self.accelerator.device` of its trainer."""
    from types import SimpleNamespace

    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(3)
    lc, lr = torch.randint(1, 30, (16,), generator=g), torch.randint(1, 30, (16,), generator=g)
    pc, pr = -torch.rand(16, generator=g, dtype=F64) * 3 * lc, -torch.rand(16, generator=g, dtype=F64) * 3 * lr
    trainer = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, *_ = orpo.ORPOTrainer.odds_ratio_loss(trainer, pc / lc, pr / lr)
    out = dpo_loss(pc, pr, None, None, beta=0.25, loss_type="orpo", chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(out.losses, -losses.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards.double(), rtol=1e-6, atol=1e-7)


def test_orpo_gradient_pushes_the_odds_apart_and_is_finite_near_probability_one():
    """Raising the chosen average log-prob lowers the loss (negative gradient), raising the rejected
    one raises it; at an average log-prob of 0 (probability 1) the loss and gradient are finite."""
    pc, pr = t(-2.0, 0.0).requires_grad_(True), t(-6.0, -3.0).requires_grad_(True)
    out = dpo_loss(pc, pr, None, None, beta=0.1, loss_type="orpo", chosen_lengths=t(2, 2), rejected_lengths=t(3, 3))
    grad_c, grad_r = torch.autograd.grad(out.losses.sum(), (pc, pr))
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
    assert grad_c[0] < 0 < grad_r[0]
