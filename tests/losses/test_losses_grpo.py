"""GRPO's advantages and loss aggregations: hand-derived numbers, naive references, and invariance
to how the rows of an optimizer step are split into micro-batches and devices."""

import math

import pytest
import torch

from plpost.losses import (
    GRPO_LOSS_TYPES,
    group_advantages,
    group_statistics,
    grpo_loss_terms,
    grpo_token_losses,
    leave_one_out_advantages,
    loss_scope,
    ppo_policy_loss,
)

F64 = torch.float64
NAN = float("nan")


def test_group_advantages_by_hand():
    """G = 4. Group 0 = (1, 0, 0, 1): mean 0.5, Bessel std sqrt((4 * 0.25) / 3) = 1/sqrt(3), so with
    eps = 0 "group" gives +-0.5 * sqrt(3). Group 1 = (2, 2, 2, 2): all equal, A = 0. The batch std
    of all 8 rewards (mean 1.25) is sqrt((2 * 0.25^2 + 2 * 1.25^2 + 4 * 0.75^2) / 7) = sqrt(5.5 / 7)."""
    rewards = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2], dtype=F64)
    half = 0.5 * math.sqrt(3)
    torch.testing.assert_close(
        group_advantages(rewards, 4, eps=0.0), torch.tensor([half, -half, -half, half, 0, 0, 0, 0], dtype=F64)
    )
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale_rewards="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=F64)
    )
    batch_std = math.sqrt(5.5 / 7)
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale_rewards="batch", eps=0.0),
        torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=F64) / batch_std,
    )
    # TRL's eps: 1e-4 is added to the std, not to the variance.
    torch.testing.assert_close(group_advantages(rewards, 4)[0], torch.tensor(0.5 / (1 / math.sqrt(3) + 1e-4), dtype=F64))


def test_group_advantages_match_a_naive_loop():
    torch.manual_seed(0)
    rewards = torch.randn(6 * 5, dtype=F64)
    expected = []
    for group in rewards.view(6, 5):
        mean = sum(group.tolist()) / 5
        std = math.sqrt(sum((r - mean) ** 2 for r in group.tolist()) / 4)
        expected += [(r - mean) / (std + 1e-4) for r in group.tolist()]
    torch.testing.assert_close(group_advantages(rewards, 5), torch.tensor(expected, dtype=F64))


def test_leave_one_out_by_hand_and_against_a_naive_loop():
    """(1, 0, 0, 1): A_0 = 1 - (0 + 0 + 1) / 3 = 2/3, A_1 = 0 - (1 + 0 + 1) / 3 = -2/3."""
    rewards = torch.tensor([1.0, 0, 0, 1], dtype=F64)
    torch.testing.assert_close(leave_one_out_advantages(rewards, 4), torch.tensor([2, -2, -2, 2], dtype=F64) / 3)
    torch.manual_seed(1)
    rewards = torch.randn(12, dtype=F64)
    groups = rewards.view(3, 4).tolist()
    naive = [r - (sum(g) - r) / 3 for g in groups for r in g]
    torch.testing.assert_close(leave_one_out_advantages(rewards, 4), torch.tensor(naive, dtype=F64))


def test_not_applicable_rewards_leave_the_statistics_and_get_zero():
    """Group (1, NaN, 0, NaN): the statistics are those of (1, 0): mean 0.5, std sqrt(0.5), count 2.
    A group with one reward has no spread, and one with none has mean 0: no NaN anywhere."""
    rewards = torch.tensor([1.0, NAN, 0, NAN, 3, NAN, NAN, NAN, NAN, NAN, NAN, NAN], dtype=F64)
    stats = group_statistics(rewards, 4)
    torch.testing.assert_close(stats.mean, torch.tensor([0.5, 3, 0], dtype=F64))
    torch.testing.assert_close(stats.std, torch.tensor([math.sqrt(0.5), 0, 0], dtype=F64))
    assert stats.count.tolist() == [2, 1, 0]
    advantages = group_advantages(rewards, 4, eps=0.0)
    torch.testing.assert_close(advantages[:4], torch.tensor([0.5, 0, -0.5, 0], dtype=F64) / math.sqrt(0.5))
    assert torch.equal(advantages[4:], torch.zeros(8, dtype=F64))
    loo = leave_one_out_advantages(rewards, 4)
    torch.testing.assert_close(loo[:4], torch.tensor([1.0, 0, -1, 0], dtype=F64))  # 1 - 0, 0 - 1
    assert torch.equal(loo[4:], torch.zeros(8, dtype=F64))


def test_group_functions_refuse_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="num_generations = 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="mean")


def test_clip_higher_clips_each_side_at_its_own_bound():
    """eps_low 0.2, eps_high 0.28. r = 1.25 with A = +1 is inside [0.8, 1.28]: loss -1.25, unclipped.
    r = 1.3, A = +1: clipped at 1.28, loss -1.28, high-clipped. r = 0.7, A = -1: clipped at 0.8,
    loss max(0.7, 0.8) = 0.8, low-clipped. r = 0.7 with A = +1 is not clipped (loss -0.7)."""
    ratios = torch.tensor([[1.25, 1.3], [0.7, 0.7]], dtype=F64)
    old = torch.zeros(2, 2, dtype=F64)
    advantages = torch.tensor([1.0, -1.0], dtype=F64)
    out = grpo_token_losses(ratios.log(), old, advantages, torch.ones(2, 2), epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(out.token_losses, torch.tensor([[-1.25, -1.28], [0.8, 0.8]], dtype=F64))
    assert out.clipped_high.tolist() == [[False, True], [False, False]]
    assert out.clipped_low.tolist() == [[False, False], [True, True]]
    positive = grpo_token_losses(ratios[1:].log(), old[1:], advantages[:1], torch.ones(1, 2), epsilon_low=0.2,
                                 epsilon_high=0.28)
    torch.testing.assert_close(positive.token_losses, torch.tensor([[-0.7, -0.7]], dtype=F64))
    # Symmetric bounds reduce to PPO's loss.
    same = grpo_token_losses(ratios.log(), old, advantages, torch.ones(2, 2), epsilon_low=0.2, epsilon_high=0.2)
    ppo = ppo_policy_loss(ratios.log(), old, advantages[:, None].expand(2, 2), torch.ones(2, 2), clip_ratio=0.2)
    torch.testing.assert_close(same.token_losses, ppo.token_losses)


def test_kl_term_is_beta_times_k3_and_zero_at_the_reference():
    """logp - ref = d = log 2 on one token: k3 = exp(-d) + d - 1 = 0.5 + log 2 - 1 = 0.19315; with
    ratio 1 and A = 0 the loss is beta * k3. Where pi == pi_ref the term is 0, and so is its gradient."""
    logp = torch.tensor([[math.log(2), 0.0]], dtype=F64, requires_grad=True)
    out = grpo_token_losses(logp, logp.detach(), torch.zeros(1, dtype=F64), torch.tensor([[1, 0]]), epsilon_low=0.2,
                            epsilon_high=0.2, ref_logprobs=torch.zeros(1, 2, dtype=F64), beta=0.1)
    k3 = 0.5 + math.log(2) - 1
    torch.testing.assert_close(out.token_losses, torch.tensor([[0.1 * k3, 0.0]], dtype=F64))
    at_ref = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    loss = grpo_token_losses(at_ref, at_ref.detach(), torch.zeros(1, dtype=F64), torch.ones(1, 2), epsilon_low=0.2,
                             epsilon_high=0.2, ref_logprobs=torch.zeros(1, 2, dtype=F64), beta=0.5).token_losses.sum()
    loss.backward()
    assert torch.equal(at_ref.grad, torch.zeros(1, 2, dtype=F64))


TOKEN_LOSSES = torch.tensor([[1.0, 2.0], [3.0, 99.0]], dtype=F64)  # 99 is padding
MASK = torch.tensor([[1, 1], [1, 0]])


@pytest.mark.parametrize(
    ("loss_type", "numerator", "denominator"),
    [("grpo", 1.5 + 3.0, 2), ("bnpo", 6.0, 3), ("dapo", 6.0, 3), ("dr_grpo", 6.0, 2 * 4), ("cispo", 6.0, 3),
     ("sapo", 1.5 + 3.0, 2)],
)
def test_each_aggregation_by_hand(loss_type, numerator, denominator):
    """Completions with token losses (1, 2) and (3,): grpo (and sapo) average per completion, then
    over the 2 completions; bnpo, dapo (and cispo) divide the token sum 6 by the 3 tokens; dr_grpo
    by 2 x max length 4."""
    terms = grpo_loss_terms(TOKEN_LOSSES, MASK, loss_type=loss_type, max_completion_length=4)
    torch.testing.assert_close(terms.numerator, torch.tensor(numerator, dtype=F64))
    assert float(terms.denominator) == denominator


def test_a_fully_masked_completion_counts_for_nothing():
    """A truncated completion masked out (all-zero row) adds no token and no completion."""
    mask = torch.tensor([[1, 1], [0, 0]])
    for loss_type in GRPO_LOSS_TYPES:
        terms = grpo_loss_terms(TOKEN_LOSSES, mask, loss_type=loss_type, max_completion_length=4)
        whole = grpo_loss_terms(TOKEN_LOSSES[:1], mask[:1], loss_type=loss_type, max_completion_length=4)
        assert torch.equal(terms.numerator, whole.numerator) and torch.equal(terms.denominator, whole.denominator)


def naive_loss(token_losses, mask, loss_type, max_length):
    """The per-step definitions written out over python lists of completions."""
    rows = [[float(v) for v, m in zip(row, keep) if m] for row, keep in zip(token_losses, mask)]
    rows = [row for row in rows if row]
    if loss_type in ("grpo", "sapo"):
        return sum(sum(row) / len(row) for row in rows) / len(rows)
    total = sum(sum(row) for row in rows)
    if loss_type == "dr_grpo":
        return total / (len(rows) * max_length)
    return total / sum(len(row) for row in rows)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_aggregation_is_invariant_to_micro_batches_and_devices(loss_type):
    """12 completions of lengths 1..8 as one micro-batch, as 4 of 3, as 5 + 5 + 2 (uneven), and as
    2 devices x 2 micro-batches: sum of numerators / sum of denominators is the same number, and
    equals the naive definition. A mean of per-micro-batch losses would not be (negative control)."""
    torch.manual_seed(0)
    token_losses = torch.randn(12, 8, dtype=F64)
    lengths = torch.tensor([1, 8, 2, 7, 3, 6, 4, 5, 8, 1, 2, 3])
    mask = torch.arange(8)[None, :] < lengths[:, None]

    def step_loss(splits):
        terms = [grpo_loss_terms(token_losses[rows], mask[rows], loss_type=loss_type, max_completion_length=8)
                 for rows in torch.arange(12).split(splits)]
        return sum(t.numerator for t in terms) / sum(t.denominator for t in terms), terms

    whole, _ = step_loss(12)
    torch.testing.assert_close(whole, torch.tensor(naive_loss(token_losses, mask, loss_type, 8), dtype=F64))
    for splits in (3, [5, 5, 2], [4, 2, 3, 3]):  # the last: device 0 holds 4 + 2 rows, device 1 3 + 3
        torch.testing.assert_close(step_loss(splits)[0], whole)
    _, uneven = step_loss([5, 5, 2])
    per_micro_batch_mean = sum(t.numerator / t.denominator for t in uneven) / len(uneven)
    assert not torch.isclose(per_micro_batch_mean, whole, rtol=1e-3)


def test_only_bnpo_normalises_over_the_whole_generation_batch():
    assert [loss_scope(t) for t in GRPO_LOSS_TYPES] == ["optimizer_step", "generation_batch", "optimizer_step",
                                                         "optimizer_step", "optimizer_step", "optimizer_step"]
    with pytest.raises(ValueError, match="unknown loss_type"):
        grpo_loss_terms(TOKEN_LOSSES, MASK, loss_type="token_mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss_terms(TOKEN_LOSSES, MASK, loss_type="dr_grpo")
