"""GSPO, CISPO, SAPO, entropy-aware updates, off-policy correction and REINFORCE++: hand-derived
numbers, the properties each definition promises, invariance where the definition allows it,
and TRL 1.16's own loss on the same inputs.

TRL's GRPO loss lives inside `GRPOTrainer._compute_loss`; it is called here on a stand-in for the
trainer that holds only what that method reads, with its forward replaced by the test's own
log-probs and entropies, so the two losses (and their gradients) are compared on one set of tensors.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from plpost.losses import (
    MomentSums,
    entropy_bonus_terms,
    entropy_threshold,
    grpo_loss_terms,
    grpo_token_losses,
    importance_log_weights,
    masked_whiten,
    moment_sums,
    off_policy_weights,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_returns,
    sampler_mismatch,
    top_entropy_mask,
)

F64 = torch.float64
NAN = float("nan")
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, NAN]], dtype=F64)  # NaN: padding


def losses_of(new, loss_type="grpo", level="token", advantages=(1.0, -1.0), **settings):
    logprobs = new.clone().requires_grad_(True)
    settings = {"epsilon_low": 0.2, "epsilon_high": 0.28, **settings}
    out = grpo_token_losses(logprobs, OLD, torch.tensor(advantages, dtype=F64), MASK, loss_type=loss_type,
                            importance_sampling_level=level, **settings)
    return logprobs, out


# -- GSPO ------------------------------------------------------------------------------------
def test_sequence_ratio_is_the_exp_of_the_mean_token_log_ratio():
    """Row 0 moves by (0.3, -0.1, 0.1): mean 0.1, s = e^0.1; row 1 by (0.2, 0.4) (its padding left
    out): mean 0.3, s = e^0.3. Token level keeps each token's own log-ratio, 0 on padding."""
    new = OLD + torch.tensor([[0.3, -0.1, 0.1], [0.2, 0.4, 7.0]], dtype=F64)
    torch.testing.assert_close(importance_log_weights(new, OLD, MASK, level="sequence"),
                               torch.tensor([[0.1], [0.3]], dtype=F64))
    torch.testing.assert_close(importance_log_weights(new, OLD, MASK, level="token"),
                               torch.tensor([[0.3, -0.1, 0.1], [0.2, 0.4, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_log_weights(new, OLD, MASK, level="completion")


def test_gspo_first_ratio_is_one_and_each_token_gets_a_over_length():
    """At pi = pi_old (the first pass), s = 1 exactly and the per-token loss is -A. The gradient of
    -s A with respect to log pi(y_t) is -A s / |y| = -A / |y|: -1/3 for row 0's three tokens
    (A = 1), +1/2 for row 1's two (A = -1), 0 on padding. Aggregated per completion ("grpo"), each
    row's loss is its one clipped sequence term, -min(s A, clip(s) A) = -A."""
    logprobs, out = losses_of(torch.nan_to_num(OLD), level="sequence")
    assert torch.equal(out.ratio, MASK.to(F64))
    torch.testing.assert_close(out.token_losses, torch.tensor([[-1.0, -1, -1], [1, 1, 0]], dtype=F64))
    terms = grpo_loss_terms(out.token_losses, MASK, loss_type="grpo")
    (terms.numerator / terms.denominator).backward()
    # d/dlogp of (row mean of -s A) / 2 completions: -A / |y| / 2.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.25, 0.25, 0]], dtype=F64))


def test_gspo_clips_whole_completions():
    """Row 0 (A = 1) gains 0.3 on every token: s = e^0.3 = 1.35 > 1 + 0.28, so the whole completion
    is clipped (loss -1.28, no gradient), though a token-level ratio would clip every token too.
    Row 1 (A = -1) moves by (+0.5, -0.5): token ratios e^0.5 and e^-0.5 (one clipped), but the mean
    log-ratio is 0, s = 1, nothing is clipped and every token keeps its gradient: the sum of the
    row's two token losses, 2 * (-s A), has d/dlog pi(y_t) = 2 * (-A) * s / 2 = 1 for each token."""
    new = OLD + torch.tensor([[0.3, 0.3, 0.3], [0.5, -0.5, 0.0]], dtype=F64)
    logprobs, out = losses_of(torch.nan_to_num(new), level="sequence")
    torch.testing.assert_close(out.token_losses, torch.tensor([[-1.28] * 3, [1.0, 1.0, 0]], dtype=F64))
    assert out.clipped_high[0].all() and not out.clipped_low.any()
    out.token_losses.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0, 0], [1.0, 1.0, 0]], dtype=F64))
    _, token_level = losses_of(torch.nan_to_num(new), level="token")
    assert token_level.clipped_low[1].tolist() == [False, True, False]


# -- CISPO and SAPO --------------------------------------------------------------------------
def test_cispo_weights_the_reinforce_gradient_by_the_capped_ratio():
    """epsilon_high = 1.2 caps the weight. Row 0 (A = 1): token ratios e^0.3 = 1.35 (capped to 1.2),
    e^-0.1 = 0.905, 1; row 1 (A = -1): e^0.2 = 1.22 (capped), 1. The gradient of
    -sg(w) A log pi is -w A: (-1.2, -0.905, -1) and (+1.2, +1); no token loses its gradient, unlike
    the clipped surrogate's, and the loss value is -w A log pi."""
    new = torch.nan_to_num(OLD + torch.tensor([[0.3, -0.1, 0.0], [0.2, 0.0, 0.0]], dtype=F64))
    logprobs, out = losses_of(new, loss_type="cispo", epsilon_high=1.2)
    weights = torch.tensor([[1.2, math.exp(-0.1), 1.0], [1.2, 1.0, 0.0]], dtype=F64)
    signs = torch.tensor([[1.0], [-1.0]], dtype=F64)
    torch.testing.assert_close(out.token_losses, -weights * signs * torch.where(MASK, new, 0.0))
    out.token_losses.sum().backward()
    torch.testing.assert_close(logprobs.grad, -weights * signs)
    assert out.clipped_high.tolist() == [[True, False, False], [False, False, False]]


def test_sapo_soft_gate_by_hand():
    """f(r) = sigmoid(tau (r - 1)) * 4 / tau. At r = 1: f = 2 / tau, so the loss is -2 A / tau
    (-2 for A = 1, tau_pos = 1; +2 / 1.05 for A = -1, tau_neg = 1.05), and df/dlog pi = f'(r) r =
    4 sigma (1 - sigma) r = 1: GRPO's gradient -A. At r = e^1 (A = 1, tau 1): sigma(e - 1) = 0.84791,
    gradient -4 * 0.84791 * 0.15209 * e = -1.40220, smaller than the unclipped surrogate's -e."""
    logprobs, out = losses_of(torch.nan_to_num(OLD), loss_type="sapo")
    torch.testing.assert_close(out.token_losses, torch.tensor([[-2.0] * 3, [2 / 1.05, 2 / 1.05, 0]], dtype=F64))
    out.token_losses.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0] * 3, [1, 1, 0]], dtype=F64))
    far, out = losses_of(torch.nan_to_num(OLD + torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=F64)), loss_type="sapo")
    out.token_losses.sum().backward()
    sigma = 1 / (1 + math.exp(-(math.e - 1)))
    torch.testing.assert_close(far.grad[0, 0], torch.tensor(-4 * sigma * (1 - sigma) * math.e, dtype=F64))
    assert abs(float(far.grad[0, 0]) + 1.40220) < 1e-5


def test_per_token_advantages_and_token_weights():
    """(B, T) advantages reach each token as given; token weights multiply the policy loss only
    (the k3 KL term is added unweighted). At r = 1 the grpo token loss is -A w."""
    advantages = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 9.0]], dtype=F64)
    weights = torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 1.0]], dtype=F64)
    logprobs = torch.nan_to_num(OLD)
    ref = logprobs - 0.1
    out = grpo_token_losses(logprobs, logprobs, advantages, MASK, epsilon_low=0.2, epsilon_high=0.2,
                            token_weights=weights, ref_logprobs=ref, beta=0.5)
    k3 = math.exp(-0.1) + 0.1 - 1
    expected = torch.tensor([[-1.0, -1.0, 0.0], [2.0, -0.5, 0.0]], dtype=F64) + 0.5 * k3 * MASK
    torch.testing.assert_close(out.token_losses, expected)


# -- off-policy correction -------------------------------------------------------------------
TRAINER = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=F64)
SAMPLER = torch.tensor([[-1.0, -2.5, NAN], [-0.5, -1.2, -9.0]], dtype=F64)  # row 1, col 2: padding


def test_truncated_and_masked_importance_weights_by_hand():
    """log pi_old - log pi_sampler = (0, 1.5, NaN -> 0) and (-0.5, 0.2): token ratios (1, e^1.5 =
    4.48, 1) and (e^-0.5 = 0.607, e^0.2 = 1.221). TIS with C = 3 caps 4.48 to 3; MIS with [0.7, 3]
    zeros 4.48 and 0.607. Sequence ratios are products: e^1.5 and e^-0.3 = 0.741; truncated at 3:
    (3, 0.741); masked to [0.8, 3]: both out (0)."""
    e = math.exp
    tis = off_policy_weights(TRAINER, SAMPLER, MASK, mode="token_truncate", clip_max=3.0)
    torch.testing.assert_close(tis, torch.tensor([[1, 3, 1], [e(-0.5), e(0.2), 0]], dtype=F64))
    mis = off_policy_weights(TRAINER, SAMPLER, MASK, mode="token_mask", clip_min=0.7, clip_max=3.0)
    torch.testing.assert_close(mis, torch.tensor([[1, 0, 1], [0, e(0.2), 0]], dtype=F64))
    seq = off_policy_weights(TRAINER, SAMPLER, MASK, mode="sequence_truncate", clip_max=3.0)
    torch.testing.assert_close(seq, torch.tensor([[3.0], [e(-0.3)]], dtype=F64))
    seq_mask = off_policy_weights(TRAINER, SAMPLER, MASK, mode="sequence_mask", clip_min=0.8, clip_max=3.0)
    torch.testing.assert_close(seq_mask, torch.zeros(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="unknown off-policy"):
        off_policy_weights(TRAINER, SAMPLER, MASK, mode="token_clip")
    with pytest.raises(ValueError, match="below clip_max"):
        off_policy_weights(TRAINER, SAMPLER, MASK, mode="token_mask", clip_min=3.0, clip_max=2.0)


def test_the_mismatch_is_measured_over_the_scored_tokens():
    """|difference| over the unmasked tokens the sampler scored: 0, 1.5, 0.5, 0.2: mean 0.55, max
    1.5; the truncated weights (1, 3, 1, 0.607, 1.221): min 0.607, mean 6.828 / 5, max 3."""
    weights = off_policy_weights(TRAINER, SAMPLER, MASK, mode="token_truncate", clip_max=3.0)
    stats = sampler_mismatch(TRAINER, SAMPLER, MASK, weights)
    torch.testing.assert_close(stats.logp_difference_mean, torch.tensor(0.55, dtype=F64))
    torch.testing.assert_close(stats.logp_difference_max, torch.tensor(1.5, dtype=F64))
    torch.testing.assert_close(stats.ratio_min, torch.tensor(math.exp(-0.5), dtype=F64))
    torch.testing.assert_close(stats.ratio_mean, torch.tensor((5 + math.exp(-0.5) + math.exp(0.2)) / 5, dtype=F64))
    torch.testing.assert_close(stats.ratio_max, torch.tensor(3.0, dtype=F64))


def test_same_sampler_and_trainer_means_weight_one():
    weights = off_policy_weights(TRAINER, TRAINER, MASK, mode="sequence_truncate", clip_min=0.5, clip_max=2.0)
    assert torch.equal(weights, torch.ones(2, 1, dtype=F64))


# -- entropy-aware updates -------------------------------------------------------------------
ENTROPIES = torch.tensor([[0.1, 0.5, 0.9], [0.3, 2.0, 5.0]], dtype=F64)  # 5.0 is padding


def test_top_entropy_quantile_by_hand():
    """Unmasked entropies 0.1, 0.3, 0.5, 0.9, 2.0. rho = 0.5: tau = the 0.5-quantile, the middle
    one, 0.5 (kept: 0.5, 0.9, 2.0). rho = 0.2: the 0.8-quantile, position 0.8 * 4 = 3.2 between
    0.9 and 2.0: 0.9 + 0.2 * 1.1 = 1.12 (kept: 2.0 only). rho = 1 keeps all five; the padding's
    5.0 never counts nor is kept."""
    assert top_entropy_mask(ENTROPIES, MASK, quantile=0.5).tolist() == [[False, True, True], [False, True, False]]
    torch.testing.assert_close(entropy_threshold(ENTROPIES, MASK, quantile=0.2), torch.tensor(1.12, dtype=F64))
    assert top_entropy_mask(ENTROPIES, MASK, quantile=0.2).tolist() == [[False, False, False], [False, True, False]]
    assert torch.equal(top_entropy_mask(ENTROPIES, MASK, quantile=1.0), MASK)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        top_entropy_mask(ENTROPIES, MASK, quantile=1.5)


def test_entropy_threshold_per_micro_batch_is_not_the_batch_threshold():
    """Where invariance does not hold by definition: the quantile is of the whole batch's
    entropies, so taking it per micro-batch (as TRL does on each micro-batch) keeps other tokens.
    Entropies (0.1, 0.2, 0.3) and (1, 2, 3), rho = 0.5: the batch's median is 0.65 (keeps 1, 2, 3);
    row 0 alone has median 0.2 (keeps 0.2, 0.3), row 1 alone 2 (keeps 2, 3): 4 tokens, not 3.
    A stage computes tau once over the generation batch."""
    entropies = torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]], dtype=F64)
    whole = top_entropy_mask(entropies, torch.ones_like(MASK), quantile=0.5)
    per_row = torch.cat([top_entropy_mask(entropies[i:i + 1], torch.ones_like(MASK[:1]), quantile=0.5) for i in (0, 1)])
    assert int(whole.sum()) == 3 and int(per_row.sum()) == 4


def test_entropy_bonus_is_minus_the_mean_token_entropy_however_split():
    """Over the 5 unmasked tokens: -(0.1 + 0.5 + 0.9 + 0.3 + 2.0) / 5 = -0.76, row by row or whole."""
    whole = entropy_bonus_terms(ENTROPIES, MASK)
    torch.testing.assert_close(whole.numerator / whole.denominator, torch.tensor(-0.76, dtype=F64))
    rows = [entropy_bonus_terms(ENTROPIES[i:i + 1], MASK[i:i + 1]) for i in (0, 1)]
    torch.testing.assert_close(sum(r.numerator for r in rows) / sum(r.denominator for r in rows),
                               torch.tensor(-0.76, dtype=F64))


# -- REINFORCE++ -----------------------------------------------------------------------------
def test_reinforce_plus_plus_returns_by_hand():
    """Score 1, KL (0.1, 0.2, 0.3), beta 0.5: G_t = 1 - 0.5 * (KL_t + ... + KL_last) = (0.7, 0.75,
    0.85). Row 1 (score -1, two tokens, KL (0.4, 0.0)): (-1.2, -1.0). A NaN score gives 0."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 99.0]], dtype=F64)
    returns = reinforce_plus_plus_returns(torch.tensor([1.0, -1.0], dtype=F64), MASK, token_kl=kl, beta=0.5)
    torch.testing.assert_close(returns, torch.tensor([[0.7, 0.75, 0.85], [-1.2, -1.0, 0.0]], dtype=F64))
    nan_score = reinforce_plus_plus_returns(torch.tensor([NAN, 2.0], dtype=F64), MASK)
    torch.testing.assert_close(nan_score, torch.tensor([[0.0, 0, 0], [2, 2, 0]], dtype=F64))


def test_reinforce_plus_plus_normalises_over_every_token_of_the_batch():
    """Returns (1, 1) and (0,): mean 2/3, Bessel variance ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3, so
    A = sqrt(3) / 3 on row 0's tokens and -2 sqrt(3) / 3 on row 1's (eps = 0). The same as
    `masked_whiten` (an independent implementation), and the same when the sums of two devices'
    halves are added instead."""
    returns = torch.tensor([[1.0, 1.0], [0.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    root = math.sqrt(3)
    torch.testing.assert_close(reinforce_plus_plus_advantages(returns, mask, eps=0.0),
                               torch.tensor([[root / 3, root / 3], [-2 * root / 3, 0]], dtype=F64))
    torch.manual_seed(0)
    returns = torch.randn(6, 5, dtype=F64)
    mask = torch.arange(5)[None] < torch.tensor([1, 5, 2, 4, 3, 5])[:, None]
    whole = reinforce_plus_plus_advantages(returns, mask)
    torch.testing.assert_close(whole, masked_whiten(returns, mask))
    halves = [moment_sums(returns[rows], mask[rows]) for rows in (slice(0, 2), slice(2, 6))]
    summed = MomentSums(*(a + b for a, b in zip(*halves)))
    split = torch.cat([reinforce_plus_plus_advantages(returns[rows], mask[rows], sums=summed)
                       for rows in (slice(0, 2), slice(2, 6))])
    torch.testing.assert_close(split, whole)
    with pytest.raises(ValueError, match="two or more"):
        reinforce_plus_plus_advantages(returns[:1], mask[:1])


# -- invariance ------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token")])
def test_new_objectives_are_invariant_to_micro_batches(loss_type, level):
    """The losses and gradients of 8 rows of random lengths, as one micro-batch or as 3 + 3 + 2 with
    the summed numerators over the summed denominators, agree: every objective is a function of
    one row at a time (GSPO's s too: rows are never split)."""
    torch.manual_seed(0)
    old = torch.randn(8, 6, dtype=F64)
    new = (old + 0.3 * torch.randn(8, 6, dtype=F64)).requires_grad_(True)
    mask = torch.arange(6)[None] < torch.tensor([1, 6, 2, 5, 3, 4, 6, 2])[:, None]
    advantages = torch.randn(8, dtype=F64)
    settings = dict(epsilon_low=0.2, epsilon_high=0.28 if loss_type != "cispo" else 1.1, loss_type=loss_type,
                    importance_sampling_level=level)

    def step(splits):
        terms = []
        for rows in torch.arange(8).split(splits):
            out = grpo_token_losses(new[rows], old[rows], advantages[rows], mask[rows], **settings)
            terms.append(grpo_loss_terms(out.token_losses, mask[rows], loss_type=loss_type))
        loss = sum(t.numerator for t in terms) / sum(t.denominator for t in terms)
        (gradient,) = torch.autograd.grad(loss, new)
        return loss.detach(), gradient

    whole, split = step(8), step([3, 3, 2])
    torch.testing.assert_close(split[0], whole[0])
    torch.testing.assert_close(split[1], whole[1])


# -- TRL 1.16 --------------------------------------------------------------------------------
def trl_loss(logprobs, entropies, inputs, **settings):
    """TRL's `GRPOTrainer._compute_loss` on a stand-in trainer whose forward returns `logprobs`."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1,
                           sapo_temperature_pos=settings.pop("sapo_temperature_pos", 1.0),
                           sapo_temperature_neg=settings.pop("sapo_temperature_neg", 1.05))
    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                  pad_across_processes=lambda x, **_: x, reduce=lambda x, **_: x)
    entropy_coef = settings.pop("entropy_coef", 0.0)
    state = dict(
        args=args, accelerator=accelerator, model=SimpleNamespace(training=True), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0,
        use_vllm=False, vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        max_completion_length=logprobs.shape[1], _entropy_bonus_enabled=entropy_coef != 0.0,
        entropy_coef=entropy_coef, use_adaptive_entropy=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, entropies, None),
    )
    trainer = SimpleNamespace(**{**state, **settings})
    trainer.get_high_entropy_mask = lambda *a: grpo_trainer.GRPOTrainer.get_high_entropy_mask(trainer, *a)
    batch = {"prompt_ids": torch.zeros(len(logprobs), 1, dtype=torch.long),
             "prompt_mask": torch.ones(len(logprobs), 1, dtype=torch.long),
             "completion_ids": torch.zeros(logprobs.shape, dtype=torch.long), **inputs}
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, batch)


TRL_CASES = {
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4), {}),
    "gspo_dr_grpo": (dict(loss_type="dr_grpo", importance_sampling_level="sequence", epsilon_low=0.2,
                          epsilon_high=0.2), {}),
    "cispo": (dict(loss_type="cispo", epsilon_low=0.2, epsilon_high=1.1), {}),
    "sapo": (dict(loss_type="sapo", epsilon_low=0.2, epsilon_high=0.2, sapo_temperature_pos=1.0,
                  sapo_temperature_neg=1.05), {}),
    "top_entropy_bonus": (dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28), dict(top_entropy_quantile=0.4,
                                                                                        entropy_coef=0.01)),
    "token_tis": (dict(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2), dict(off_policy="token_truncate")),
    "sequence_mis": (dict(loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2), dict(off_policy="sequence_mask")),
}


@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_trl_compute_loss_gives_the_same_loss_and_gradient(case):
    """One micro-batch of 6 completions of lengths 1-6, the policy moved from the old one, so
    ratios clip. The loss and its gradient with respect to the log-probs (and the entropies, for the
    bonus) agree with TRL's to 1e-6: each option is TRL's, under TRL's name, on one micro-batch
    (where per-micro-batch and per-step quantities coincide)."""
    ours_settings, extra = TRL_CASES[case]
    torch.manual_seed(3)
    old = -torch.rand(6, 6, dtype=F64) * 2
    new = old + 0.2 * torch.randn(6, 6, dtype=F64)
    sampler = old + 0.3 * torch.randn(6, 6, dtype=F64)
    mask = torch.arange(6)[None] < torch.tensor([1, 6, 2, 5, 3, 4])[:, None]
    entropies = torch.rand(6, 6, dtype=F64) * 3
    advantages = torch.randn(6, dtype=F64)
    loss_type = ours_settings["loss_type"]

    ours_logprobs, ours_entropies = new.clone().requires_grad_(True), entropies.clone().requires_grad_(True)
    keep = mask
    if "top_entropy_quantile" in extra:
        keep = top_entropy_mask(entropies, mask, quantile=extra["top_entropy_quantile"])
    weights = None
    if "off_policy" in extra:
        weights = off_policy_weights(old, sampler, mask, mode=extra["off_policy"], clip_min=0.5, clip_max=1.5)
    out = grpo_token_losses(ours_logprobs, old, advantages, mask, token_weights=weights if keep is mask else keep * 1.0,
                            **{k: v for k, v in ours_settings.items()})
    terms = grpo_loss_terms(out.token_losses, mask, loss_type=loss_type, max_completion_length=6)
    ours = terms.numerator / terms.denominator
    if "entropy_coef" in extra:
        bonus = entropy_bonus_terms(ours_entropies, keep)
        ours = ours + extra["entropy_coef"] * bonus.numerator / bonus.denominator
    ours_grads = torch.autograd.grad(ours, (ours_logprobs, ours_entropies), allow_unused=True)

    theirs_logprobs, theirs_entropies = new.clone().requires_grad_(True), entropies.clone().requires_grad_(True)
    inputs = {"completion_mask": mask.long(), "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum()}
    trl_settings = dict(ours_settings)
    if "top_entropy_quantile" in extra:
        trl_settings.update(top_entropy_quantile=extra["top_entropy_quantile"], entropy_coef=extra["entropy_coef"])
    if weights is not None:
        trl_settings.update(use_vllm=True, vllm_importance_sampling_correction=True)
        inputs["importance_sampling_ratio"] = weights
    theirs = trl_loss(theirs_logprobs, theirs_entropies, inputs, **trl_settings)
    theirs_grads = torch.autograd.grad(theirs, (theirs_logprobs, theirs_entropies), allow_unused=True)

    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-6)
    for mine, trls in zip(ours_grads, theirs_grads):
        if mine is None or trls is None:
            assert mine is None and trls is None or (trls if mine is None else mine).abs().max() == 0
        else:
            torch.testing.assert_close(torch.where(mask, mine, 0.0), torch.where(mask, trls, 0.0), rtol=1e-6, atol=1e-6)
