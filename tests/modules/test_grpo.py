"""GRPOModule: the first ratio is exactly 1, the first step's gradients do not depend on the
micro-batch layout, no reference without a KL term, dynamic sampling, truncated completions,
rewards that do not apply, and the settings it refuses."""

from functools import partial

import lightning as L
import pytest
import torch

import plpost.modules.grpo as grpo_module
from conftest import TINY, GradientCapture
from plpost import GRPOModule, PromptDataModule
from plpost.losses import GRPO_LOSS_TYPES
from plpost.rewards import RewardFunction

QUESTIONS = ["1+1", "12+34", "5", "99+99+1"]
ROWS = [{"prompt": [{"role": "user", "content": q}], "answer": "0"} for q in QUESTIONS]
G = 4


def text_value(prompts, completions, **columns) -> torch.Tensor:
    """Differs between any two different completions, so groups almost never have equal rewards."""
    return torch.tensor([sum(ord(ch) for ch in c) / 1000.0 for c in completions])


def constant_for_five(prompts, completions, **columns):
    """1.0 for every completion of the prompt "5" (a group with no signal), text_value otherwise."""
    values = text_value(prompts, completions).tolist()
    return [1.0 if p[-1]["content"] == "5" else v for p, v in zip(prompts, values)]


def none_for_five(prompts, completions, **columns):
    """Not applicable (None) to the prompt "5"."""
    values = text_value(prompts, completions).tolist()
    return [None if p[-1]["content"] == "5" else v for p, v in zip(prompts, values)]


def grpo(reward=text_value, **overrides) -> GRPOModule:
    settings = dict(num_generations=G, max_new_tokens=4, optimizer=partial(torch.optim.SGD, lr=0.1))
    return GRPOModule(TINY, rewards=[RewardFunction(reward)], **{**settings, **overrides})


def fit(module, *, max_steps=1, callbacks=(), batch_size=4) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, PromptDataModule(TINY, ROWS, batch_size=batch_size, shuffle=False))
    return trainer


def capture_updates(module) -> list[dict]:
    """Wraps the module's real sampling and advantages so a test can read what the update was given."""
    seen, generate, advantages_of = [], module.generate, module.advantages

    def generating(batch):
        groups = generate(batch)
        seen.append({"groups": groups})
        return groups

    def advantages(rewards, *args):
        values = advantages_of(rewards, *args)
        seen[-1]["advantages"] = values.clone()
        return values

    module.generate, module.advantages = generating, advantages
    return seen


def test_ratio_is_exactly_one_until_the_first_optimizer_step(monkeypatch):
    """2 iterations x 2 mini-batches x 2 micro-batches: the old log-probs come from the first pass's
    layout, so both micro-batches before the first optimizer step see pi / pi_old = 1 bit for bit;
    every later call follows an update (the negative control: there the ratio has moved)."""
    calls, original = [], grpo_module.grpo_token_losses

    def recording(logprobs, old_logprobs, advantages, mask, **kw):
        out = original(logprobs, old_logprobs, advantages, mask, **kw)
        calls.append((mask.clone(), out.ratio))
        return out

    monkeypatch.setattr(grpo_module, "grpo_token_losses", recording)
    module = grpo(num_iterations=2, num_mini_batches=2, gradient_accumulation_steps=2, temperature=0.7)
    trainer = fit(module, max_steps=4)
    assert trainer.global_step == 4 and len(calls) == 8
    for mask, ratio in calls[:2]:
        assert mask.any() and torch.equal(ratio[mask], torch.ones_like(ratio[mask]))
    assert any(not torch.equal(ratio[mask], torch.ones_like(ratio[mask])) for mask, ratio in calls[2:])


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_first_step_gradients_do_not_depend_on_the_micro_batches(loss_type):
    """16 completions (4 prompts x 4) of different lengths as one micro-batch, or as 3 accumulated
    micro-batches of 6, 5 and 5: the same samples (drawn before the split), so the same gradients."""
    gradients = []
    for accumulation in (1, 3):
        capture = GradientCapture()
        fit(grpo(loss_type=loss_type, gradient_accumulation_steps=accumulation, max_new_tokens=6, beta=0.1,
                 gradient_clip_val=None, epsilon_high=5.0 if loss_type == "cispo" else None),
            callbacks=[capture])
        gradients.append(capture.gradients)
    whole, split = gradients
    assert whole.keys() == split.keys() and whole
    assert any(g.abs().sum() > 0 for g in whole.values())
    for name, gradient in whole.items():
        torch.testing.assert_close(split[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_beta_zero_loads_no_reference_and_checkpoints_hold_none(tmp_path):
    module = grpo()
    trainer = fit(module)
    assert module.reference is None and "reference" not in module.frozen_sources()
    trainer.save_checkpoint(tmp_path / "grpo.ckpt")
    checkpoint = torch.load(tmp_path / "grpo.ckpt", weights_only=True)
    assert not any(k.startswith(("reference.", "reward_scorer.sources.")) for k in checkpoint["state_dict"])
    assert float(checkpoint["state_dict"]["episodes"]) == 16
    with_kl = grpo(beta=0.04)
    with_kl.configure_model()
    assert with_kl.reference is not None and "reference" in with_kl.frozen_sources()


def test_dynamic_sampling_resamples_then_drops_groups_with_equal_rewards():
    """The prompt "5" always scores 1.0: its group is sampled again max_resample_rounds = 2 times,
    then dropped (its tokens leave the loss); the other three groups have spread and are kept."""
    module = grpo(reward=constant_for_five, dynamic_sampling=True, max_resample_rounds=2)
    seen = capture_updates(module)
    trainer = fit(module)
    groups = seen[0]["groups"]
    five = QUESTIONS.index("5")
    assert groups.kept.tolist() == [i != five for i in range(4)] and groups.resampled == 2
    rows = slice(five * G, (five + 1) * G)
    assert not groups.loss_mask[rows].any() and groups.samples.response_mask[rows].any()
    assert torch.equal(seen[0]["advantages"][rows], torch.zeros(G))
    assert float(trainer.callback_metrics["dynamic_sampling/filtered"]) == 0.25
    assert float(trainer.callback_metrics["dynamic_sampling/resampled"]) == 0.5


def test_truncated_completions_leave_the_loss_but_not_the_reward_statistics():
    """With 2 new tokens the tiny base model never stops: every completion is truncated, so none
    is in the loss (a zero gradient), while their rewards still made the advantages."""
    module = grpo(mask_truncated_completions=True, max_new_tokens=2)
    seen = capture_updates(module)
    capture = GradientCapture()
    trainer = fit(module, callbacks=[capture])
    groups = seen[0]["groups"]
    assert not groups.samples.stopped.any() and not groups.loss_mask.any()
    assert seen[0]["advantages"].abs().sum() > 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in capture.gradients.values())
    assert float(trainer.callback_metrics["completions/clipped_ratio"]) == 1.0


def test_completions_no_reward_applies_to_get_advantage_zero():
    module = grpo(reward=none_for_five)
    seen = capture_updates(module)
    trainer = fit(module)
    five = QUESTIONS.index("5")
    rewards, advantages = seen[0]["groups"].rewards, seen[0]["advantages"]
    assert torch.isnan(rewards[five * G : (five + 1) * G]).all()
    assert torch.equal(advantages[five * G : (five + 1) * G], torch.zeros(G))
    assert torch.isfinite(advantages).all() and advantages.abs().sum() > 0
    assert torch.isfinite(trainer.callback_metrics["reward"])


def test_trl_metric_names_are_logged():
    trainer = fit(grpo(beta=0.04, epsilon_high=0.28))
    for name in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                 "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "rewards/text_value/mean",
                 "perf/episodes_per_s", "time/generation_s", "time/update_s"):
        assert name in trainer.callback_metrics, name


@pytest.mark.parametrize(
    ("settings", "message"),
    [(dict(num_generations=1), "num_generations"), (dict(advantage_estimator="rloo"), "scale_rewards: none"),
     (dict(loss_type="token_mean"), "unknown loss_type"), (dict(beta=0.1, reference="adapter"), "LoRA")],
)
def test_settings_that_cannot_work_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        grpo(**settings)
