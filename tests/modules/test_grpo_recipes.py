"""GRPOModule's recipe options: GSPO's first ratio is exactly 1, the first step's gradients do not
depend on the micro-batches for every recipe, the sampler's log-probs are the sampling
distribution's, REINFORCE++'s advantages are normalised over the batch, and the refusals."""

import math

import pytest
import torch
from conftest import GradientCapture
from test_grpo import capture_updates, fit, grpo

import plpost.modules.grpo as grpo_module


def test_gspo_sequence_ratio_is_exactly_one_until_the_first_optimizer_step(monkeypatch):
    """2 iterations x 2 mini-batches: the micro-batches before the first optimizer step see s = 1
    bit for bit (the old log-probs come from the same forward), the later ones a moved s."""
    calls, original = [], grpo_module.grpo_token_losses

    def recording(logprobs, old_logprobs, advantages, mask, **kw):
        out = original(logprobs, old_logprobs, advantages, mask, **kw)
        calls.append((mask.clone(), out.ratio, kw["importance_sampling_level"]))
        return out

    monkeypatch.setattr(grpo_module, "grpo_token_losses", recording)
    fit(grpo(importance_sampling_level="sequence", loss_type="grpo", num_iterations=2, num_mini_batches=2,
             epsilon_low=3e-4, epsilon_high=4e-4, temperature=0.7), max_steps=4)
    assert len(calls) == 4 and all(level == "sequence" for *_, level in calls)
    mask, ratio, _ = calls[0]
    assert mask.any() and torch.equal(ratio[mask], torch.ones_like(ratio[mask]))
    moved = [ratio for mask, ratio, _ in calls[1:] if not torch.equal(ratio[mask], torch.ones_like(ratio[mask]))]
    assert moved
    for (mask, ratio, _) in calls[1:]:  # one ratio per completion, shared by its tokens
        for row, keep in zip(ratio, mask):
            if keep.any():
                assert torch.all(row[keep] == row[keep][0])


RECIPES = {
    "gspo": dict(importance_sampling_level="sequence", loss_type="grpo", epsilon_low=3e-4, epsilon_high=4e-4),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo"),
    "top_entropy_and_bonus": dict(top_entropy_quantile=0.5, entropy_coef=0.01),
    "off_policy_token_truncate": dict(off_policy_correction="token_truncate", top_p=0.9),
    "reinforce_plus_plus": dict(advantage_estimator="reinforce_plus_plus", scale_rewards="none", kl_mode="reward"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_first_step_gradients_do_not_depend_on_the_micro_batches(recipe):
    """16 completions as one micro-batch or as 3 accumulated ones (6, 5, 5): the same samples, so the
    same gradients. This holds for the sequence ratio (a row is never split), the entropy threshold
    and the REINFORCE++ statistics (both taken over the whole generation batch before the update),
    and the entropy bonus (divided by the step's trained tokens, not per micro-batch)."""
    gradients = []
    for accumulation in (1, 3):
        capture = GradientCapture()
        fit(grpo(gradient_accumulation_steps=accumulation, max_new_tokens=6, beta=0.1, gradient_clip_val=None,
                 **RECIPES[recipe]), callbacks=[capture])
        gradients.append(capture.gradients)
    whole, split = gradients
    assert whole.keys() == split.keys() and whole and any(g.abs().sum() > 0 for g in whole.values())
    for name, gradient in whole.items():
        torch.testing.assert_close(split[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def capture_token_weights(module) -> list:
    seen, original = [], module.token_weights

    def recording(mask, old, sampler, entropies):
        weights, stats = original(mask, old, sampler, entropies)
        seen.append((mask, old, sampler, weights, stats))
        return weights, stats

    module.token_weights = recording
    return seen


def test_sampler_logprobs_are_those_of_the_distribution_sampled_from():
    """With top_k = 1 the sampler's distribution puts probability 1 on the token it picks, so its
    log-prob is 0 and the weight pi_old / pi_sampler is pi_old(y_t) itself: exp(old log-prob) on
    every unmasked token (TIS with no lower bound and C = 3 leaves values <= 1 as they are)."""
    module = grpo(off_policy_correction="token_truncate", top_k=1)
    seen = capture_token_weights(module)
    trainer = fit(module)
    mask, old, sampler, weights, stats = seen[0]
    assert torch.equal(sampler[mask], torch.zeros_like(old[mask]))
    torch.testing.assert_close(weights[mask], old[mask].exp())
    assert float(trainer.callback_metrics["sampling/importance_sampling_ratio/max"]) <= 1.0
    torch.testing.assert_close(stats["sampling/sampling_logp_difference/mean"], (-old[mask]).mean())


def test_without_truncation_the_sampler_and_trainer_agree_to_rounding():
    """Full sampling distribution (no top_k / top_p), float32: the sampler's log-probs (KV-cache
    forward inside generate) and the trainer's (one forward over the whole sequence) differ by
    rounding only, so every weight is 1 to 1e-4: the mismatch logged is the numerical one."""
    module = grpo(off_policy_correction="sequence_truncate", off_policy_clip_min=0.5, off_policy_clip_max=2.0)
    seen = capture_token_weights(module)
    fit(module)
    mask, old, sampler, weights, stats = seen[0]
    assert weights.shape == (len(old), 1)
    torch.testing.assert_close(weights, torch.ones_like(weights), rtol=0, atol=1e-4)
    assert float(stats["sampling/sampling_logp_difference/max"]) < 1e-4


def test_reinforce_plus_plus_advantages_are_normalised_over_every_token():
    """Per token, (B * G, R): over the loss tokens of the generation batch their mean is 0 and their
    Bessel std 1; with beta = 0.1 and kl_mode reward the KL makes tokens of one completion differ."""
    module = grpo(advantage_estimator="reinforce_plus_plus", scale_rewards="none", beta=0.1, kl_mode="reward",
                  max_new_tokens=6)
    updates = capture_updates(module)
    fit(module, max_steps=2)
    advantages, mask = updates[-1]["advantages"], updates[-1]["groups"].loss_mask
    assert advantages.shape == mask.shape
    values = advantages[mask].double()
    assert abs(float(values.mean())) < 1e-6 and abs(float(values.std()) - 1.0) < 1e-4
    rows = [advantages[i][mask[i]] for i in range(len(mask)) if mask[i].sum() > 1]
    assert any(not torch.allclose(row, row[0].expand_as(row)) for row in rows)


def test_reinforce_plus_plus_baseline_centres_each_group():
    """Without KL, REINFORCE++-baseline's advantages are (r - group mean) / (batch std of those,
    token-weighted), constant over a completion's tokens: checked against that formula."""
    module = grpo(advantage_estimator="reinforce_plus_plus_baseline", scale_rewards="none")
    updates = capture_updates(module)
    fit(module)
    groups, advantages = updates[0]["groups"], updates[0]["advantages"]
    mask = groups.loss_mask
    centred = groups.rewards - groups.rewards.view(-1, 4).mean(1).repeat_interleave(4)
    returns = centred[:, None].expand_as(mask)[mask].double()
    expected = (centred[:, None].double() - returns.mean()) / math.sqrt(float(returns.var()) + 1e-8)
    torch.testing.assert_close(advantages[mask].double(), expected.expand_as(mask)[mask], rtol=1e-5, atol=1e-6)


def test_the_top_entropy_mask_keeps_the_chosen_share_of_tokens():
    """rho = 0.5: about half the loss tokens (ties at the threshold kept) train; logged as entropy_mask/kept."""
    trainer = fit(grpo(top_entropy_quantile=0.5, max_new_tokens=6))
    kept = float(trainer.callback_metrics["entropy_mask/kept"])
    assert 0.45 <= kept <= 0.65


@pytest.mark.parametrize(
    ("settings", "message"),
    [(dict(loss_type="cispo"), "must be > 1"),
     (dict(advantage_estimator="reinforce_plus_plus"), "scale_rewards: none"),
     (dict(advantage_estimator="ppo"), "unknown advantage_estimator"),
     (dict(importance_sampling_level="batch"), "importance_sampling_level"),
     (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
     (dict(off_policy_correction="token_clip"), "unknown off_policy_correction"),
     (dict(off_policy_correction="token_mask", off_policy_clip_min=2.0, off_policy_clip_max=1.0), "below"),
     (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature")],
)
def test_recipe_settings_that_cannot_work_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        grpo(**settings)
