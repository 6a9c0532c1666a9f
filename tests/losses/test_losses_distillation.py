"""token_divergence: hand-derived values, a naive reference, the properties the divergences must
have, and TRL 1.16's values on the same inputs."""

import math

import pytest
import torch

from plpost.losses import masked_sum, token_divergence

# One position, two tokens. Student logits (0, 0): s = (1/2, 1/2). Teacher logits (ln 3, 0):
# t = (3/4, 1/4).
STUDENT = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)
TEACHER = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)
ONE = torch.ones(1, 1, dtype=torch.bool)


def divergence(student, teacher, mask=ONE, **settings):
    return token_divergence(student, teacher, mask, **settings)


def test_forward_and_reverse_kl_by_hand():
    """KL(t || s) = 3/4 ln((3/4)/(1/2)) + 1/4 ln((1/4)/(1/2)) = 3/4 ln(3/2) - 1/4 ln 2 = 0.130812;
    KL(s || t) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3) = 0.143841."""
    forward = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)
    reverse = 0.5 * math.log(4.0 / 3.0)
    assert divergence(STUDENT, TEACHER, divergence="forward_kl").item() == pytest.approx(forward, abs=1e-12)
    assert divergence(STUDENT, TEACHER, divergence="reverse_kl").item() == pytest.approx(reverse, abs=1e-12)
    assert forward == pytest.approx(0.130812, abs=1e-6) and reverse == pytest.approx(0.143841, abs=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.25])
def test_generalised_jsd_by_hand(beta):
    """beta weights the teacher: m = beta t + (1 - beta) s, JSD = beta KL(t || m) + (1 - beta) KL(s || m).
    beta = 0.5: m = (5/8, 3/8), KL(t || m) = 3/4 ln(6/5) + 1/4 ln(2/3), KL(s || m) = 1/2 ln(4/5) + 1/2 ln(4/3),
    JSD = 0.0338221. beta = 0.25: m = (9/16, 7/16), JSD = 0.0248700 (not the value at 0.75, 0.0260482: the
    side that beta weights is pinned)."""
    t, s = (0.75, 0.25), (0.5, 0.5)
    m = [beta * tv + (1 - beta) * sv for tv, sv in zip(t, s)]
    kl_t = sum(p * math.log(p / q) for p, q in zip(t, m))
    kl_s = sum(p * math.log(p / q) for p, q in zip(s, m))
    expected = beta * kl_t + (1 - beta) * kl_s
    assert expected == pytest.approx({0.5: 0.0338221, 0.25: 0.0248700}[beta], abs=1e-7)
    assert divergence(STUDENT, TEACHER, divergence="jsd", beta=beta).item() == pytest.approx(expected, abs=1e-12)


def test_temperature_divides_both_logits():
    """Teacher logits (2 ln 3, 0) at temperature 2 are (ln 3, 0) at 1; the student's (0, 0) stay (0, 0)."""
    for name in ("forward_kl", "reverse_kl", "jsd"):
        hot = divergence(STUDENT, 2 * TEACHER, divergence=name, temperature=2.0)
        torch.testing.assert_close(hot, divergence(STUDENT, TEACHER, divergence=name))


def naive(student, teacher, mask, name, beta, temperature):
    """Position by position, token by token, from the probabilities."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                continue
            s = torch.softmax(student[b, i].double() / temperature, -1).tolist()
            t = torch.softmax(teacher[b, i].double() / temperature, -1).tolist()
            m = [beta * tv + (1 - beta) * sv for tv, sv in zip(t, s)]

            def kl(p, q):
                return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0)

            out[b, i] = {"forward_kl": kl(t, s), "reverse_kl": kl(s, t),
                         "jsd": beta * kl(t, m) + (1 - beta) * kl(s, m)}[name]
    return out


def random_case(seed=0, shape=(3, 5, 7), scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=generator) * scale
    teacher = torch.randn(*shape, generator=generator) * scale
    mask = torch.rand(shape[:-1], generator=generator) > 0.3
    return student, teacher, mask


@pytest.mark.parametrize("name,beta,temperature", [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 0.7),
                                                    ("jsd", 0.5, 1.0), ("jsd", 0.1, 1.3), ("jsd", 0.9, 1.0)])
def test_matches_the_naive_reference(name, beta, temperature):
    student, teacher, mask = random_case()
    got = token_divergence(student, teacher, mask, divergence=name, beta=beta, temperature=temperature)
    torch.testing.assert_close(got.double(), naive(student, teacher, mask, name, beta, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_the_student_is_the_teacher_and_positive_otherwise(name):
    student, teacher, mask = random_case(scale=5.0)
    assert torch.equal(token_divergence(student, student.clone(), mask, divergence=name), torch.zeros(mask.shape))
    different = token_divergence(student, teacher, mask, divergence=name)
    assert (different[mask] > 0).all() and (different[~mask] == 0).all()


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.95])
def test_jsd_is_bounded_by_the_binary_entropy_of_beta(beta):
    """JSD_beta <= h(beta) = -beta ln beta - (1 - beta) ln(1 - beta) <= ln 2, reached for disjoint supports:
    logits of +-30 make the two distributions nearly disjoint."""
    student = torch.tensor([[[30.0, -30.0]]], dtype=torch.float64)
    teacher = -student
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    near_disjoint = divergence(student, teacher, divergence="jsd", beta=beta).item()
    assert near_disjoint == pytest.approx(bound, abs=1e-9) and bound <= math.log(2)
    student, teacher, mask = random_case(scale=10.0)
    assert (token_divergence(student, teacher, mask, divergence="jsd", beta=beta) <= bound + 1e-6).all()


def test_jsd_swaps_sides_with_beta():
    """JSD_beta(s, t) = JSD_{1 - beta}(t, s): the mixture and the two weights trade places."""
    student, teacher, mask = random_case()
    torch.testing.assert_close(token_divergence(student, teacher, mask, divergence="jsd", beta=0.3),
                               token_divergence(teacher, student, mask, divergence="jsd", beta=0.7))


def test_the_kls_are_the_limits_of_the_jsd_divided_by_its_vanishing_weight():
    """TRL's beta = 0 and 1: JSD_beta / beta -> KL(t || s) as beta -> 0, JSD_beta / (1 - beta) -> KL(s || t)
    as beta -> 1 (the error is O(beta))."""
    student, teacher, mask = random_case()
    student, teacher, eps = student.double(), teacher.double(), 1e-9
    forward = token_divergence(student, teacher, mask, divergence="forward_kl")
    reverse = token_divergence(student, teacher, mask, divergence="reverse_kl")
    torch.testing.assert_close(token_divergence(student, teacher, mask, divergence="jsd", beta=eps) / eps, forward,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(token_divergence(student, teacher, mask, divergence="jsd", beta=1 - eps) / eps,
                               reverse, rtol=1e-4, atol=1e-6)


def test_masked_positions_are_never_read():
    student, teacher, mask = random_case()
    poisoned = student.clone()
    poisoned[~mask] = float("nan")
    for name in ("forward_kl", "reverse_kl", "jsd"):
        torch.testing.assert_close(token_divergence(poisoned, teacher, mask, divergence=name),
                                   token_divergence(student, teacher, mask, divergence=name))


def test_gradients_reach_the_student_and_match_the_naive_reference():
    student, teacher, mask = random_case(shape=(2, 3, 4))
    student = student.double().requires_grad_()
    naive_student = student.detach().clone().requires_grad_()
    token_divergence(student, teacher.double(), mask, divergence="jsd", beta=0.3).sum().backward()
    s, t = torch.softmax(naive_student, -1), torch.softmax(teacher.double(), -1)
    m = 0.3 * t + 0.7 * s
    jsd = 0.3 * (t * (t / m).log()).sum(-1) + 0.7 * (s * (s / m).log()).sum(-1)
    (jsd * mask).sum().backward()
    torch.testing.assert_close(student.grad, naive_student.grad)
    assert (student.grad[~mask] == 0).all() and student.grad[mask].abs().sum() > 0


def test_refuses_what_cannot_be_computed():
    student, teacher, mask = random_case()
    with pytest.raises(ValueError, match="same vocabulary"):
        token_divergence(student, teacher[..., :-1], mask, divergence="jsd")
    with pytest.raises(ValueError, match="strictly between 0 and 1.*forward_kl"):
        token_divergence(student, teacher, mask, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(student, teacher, mask, divergence="kl")


@pytest.mark.parametrize("name,trl_beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.2)])
def test_trl_generalized_jsd_loss_gives_the_same_value(name, trl_beta):
    """TRL 1.16's GKDTrainer.generalized_jsd_loss averages over the tokens with a label (batchmean with labels);
    its DistillationTrainer's kernel gives the same per-token values (fed the logits through an identity head)."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    chunked = pytest.importorskip("trl.kernels.chunked_divergence")
    student, teacher, mask = random_case(seed=1)
    ours = token_divergence(student, teacher, mask, divergence=name, beta=trl_beta, temperature=0.8)
    labels = torch.where(mask, torch.zeros(mask.shape, dtype=torch.long), torch.full(mask.shape, -100))
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=trl_beta, temperature=0.8)
    torch.testing.assert_close(masked_sum(ours, mask) / mask.sum(), theirs, rtol=1e-6, atol=1e-7)
    identity = torch.eye(student.shape[-1])
    per_token, _ = chunked.ChunkedDivergenceFunction.apply(
        student[mask], identity, None, teacher[mask], identity, None, trl_beta, 0.8)
    torch.testing.assert_close(ours[mask], per_token, rtol=1e-5, atol=1e-6)
