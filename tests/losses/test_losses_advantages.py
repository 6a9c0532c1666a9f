"""Tests for plpost.losses.advantages: GAE by hand, against a naive double loop, and limits."""

import torch

from plpost.losses import gae

F64 = torch.float64


def naive_gae(rewards, values, mask, gamma, lam):
    """Per sequence, per step: A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k over the L valid tokens,
    delta_k = r_k + gamma V_{k+1} - V_k with V_L = 0."""
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        for t in range(length):
            total = 0.0
            for k in range(t, length):
                next_value = float(values[b, k + 1]) if k + 1 < length else 0.0
                delta = float(rewards[b, k]) + gamma * next_value - float(values[b, k])
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
            ret[b, t] = total + float(values[b, t])
    return adv, ret


def test_three_step_example_by_hand():
    """gamma = lam = 0.5, r = (0, 0, 1), V = (0.5, 0.5, 0.5), and a padded 4th step.
    delta = (-0.25, -0.25, 0.5); A_2 = 0.5, A_1 = -0.25 + 0.25 * 0.5 = -0.125,
    A_0 = -0.25 + 0.25 * -0.125 = -0.28125; R = A + V = (0.21875, 0.375, 1.0); padding is 0."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.5, 0.5, float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.28125, -0.125, 0.5, 0.0]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[0.21875, 0.375, 1.0, 0.0]], dtype=F64))


def test_matches_naive_double_loop():
    """Random rows of lengths 6, 3, 1 and 0, NaN in the padding."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=g, dtype=F64)
    values = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    lengths = torch.tensor([6, 3, 1, 0])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    noisy = torch.where(mask, rewards, torch.full_like(rewards, float("nan")))
    adv, ret = gae(noisy, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = naive_gae(rewards, values.detach(), mask, 0.9, 0.8)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert not adv.requires_grad and not ret.requires_grad


def test_gamma_lam_one_is_reward_to_go_minus_value():
    """With gamma = lam = 1 the deltas telescope: A_t = sum_{k >= t} r_k - V_t, and R_t is the
    undiscounted reward-to-go."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(2, 5, generator=g, dtype=F64)
    values = torch.randn(2, 5, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    kept = rewards * mask
    to_go = kept.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, (to_go - values) * mask)


def test_lam_zero_is_one_step_td_error():
    """lam = 0 keeps only delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0)."""
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 2.0]], dtype=F64)
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0 + 0.5 - 0.5, 2.0 + 1.0 - 1.0, 3.0 - 2.0]], dtype=F64))


def test_environment_tokens_between_turns_are_skipped_by_the_recursion():
    """A multi-turn row: policy tokens at positions 0, 1, 4, 5, the environment's at 2, 3, padding
    after. The policy's tokens are the steps of the episode, so GAE must equal GAE over the
    compacted row (0, 1, 4, 5 -> 0, 1, 2, 3), whatever rewards and values sit at the gaps; by hand,
    gamma = lam = 1, r = (0, 0, 0, 1), V = (0.5, 0.5, 0.5, 0.5): A_t = 1 - V_t = 0.5 on every step."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.0, 7.0, 7.0, 0.0, 1.0, 7.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.5, 9.0, 9.0, 0.5, 0.5, 9.0]], dtype=F64)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.0]]
    assert returns.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]]

    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(1, 7, generator=generator, dtype=F64), torch.randn(1, 7, generator=generator, dtype=F64)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    kept = mask[0]
    compact_advantages, compact_returns = naive_gae(rewards[:, kept], values[:, kept], torch.ones(1, 4), 0.9, 0.8)
    assert torch.allclose(advantages[:, kept], compact_advantages) and torch.allclose(returns[:, kept], compact_returns)
