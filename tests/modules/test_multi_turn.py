"""GRPO and PPO on multi-turn episodes (an environment answers the policy): the first ratio is
exactly 1, the gradients do not depend on the micro-batches, no environment token ever reaches a
loss, a KL term, a value loss or a normaliser, and both stages log their episodes.

The policy is the bundled model after a short SFT (`sft_export`): it answers sums and ends its
turns, wrongly on many carries, so `TryAgain` episodes run to different numbers of turns."""

from functools import partial

import lightning as L
import pytest
import torch

import plpost.modules.grpo as grpo_module
import plpost.modules.online as online_module
import plpost.modules.online_rl as online_rl_module
import plpost.modules.ppo as ppo_module
from conftest import TINY, GradientCapture
from plpost import GRPOModule, PPOModule, PromptDataModule
from plpost.rewards import EnvironmentReward, RewardFunction
from plpost.rollout import ResponseForward, response_forward
from plpost.tasks.addition import TryAgain, exact_match_reward

ROWS = [{"prompt": [{"role": "user", "content": q}], "answer": str(eval(q))}
        for q in ["37+48", "59+26", "18+27", "66+19", "45+38", "23+59", "77+15", "34+47"]]


def conversation_length(prompts, completions, conversation, **columns) -> torch.Tensor:
    """Differs between episodes of different turns and texts, so groups have advantages to train on."""
    return torch.tensor([sum(len(m["content"]) for m in messages) / 10.0 for messages in conversation])


def stage(kind, model, **overrides):
    settings = dict(rewards=[EnvironmentReward(), RewardFunction(exact_match_reward)],
                    environment=TryAgain(max_turns=3), max_new_tokens=6, gradient_clip_val=None,
                    optimizer=partial(torch.optim.SGD, lr=0.1))
    if kind is GRPOModule:
        settings["num_generations"] = 4
    return kind(model, **{**settings, **overrides})


def fit(module, *, callbacks=(), batch_size=4, max_steps=1) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, PromptDataModule(TINY, ROWS, batch_size=batch_size, shuffle=False))
    return trainer


def environment_positions(attention_mask, response_mask):
    return attention_mask[:, -response_mask.shape[1]:].bool() & ~response_mask


def poisoned(values, env):
    return None if values is None else torch.where(env, torch.full_like(values, float("nan")), values)


def poisoned_response_forward(counts: list):
    """response_forward with NaN log-probs and entropies at every environment position: anything
    that reads them unmasked (a product with the mask, a sum over the row) turns a loss or a
    gradient NaN. (The hidden states stay: a head computes on every position before any mask.)"""
    def forward(model, input_ids, attention_mask, position_ids, response_mask, **kwargs):
        out = response_forward(model, input_ids, attention_mask, position_ids, response_mask, **kwargs)
        env = environment_positions(attention_mask, response_mask)
        counts.append(int(env.sum()))
        return ResponseForward(poisoned(out.logprobs, env), poisoned(out.entropy, env), out.hidden)

    return forward


@pytest.mark.parametrize("kind", [GRPOModule, PPOModule])
def test_no_environment_token_reaches_a_loss_a_kl_term_or_a_normaliser(kind, sft_export, monkeypatch):
    """The policy's, the sampling policy's and the reference's log-probs, the entropies and (PPO)
    the values are NaN at the environment's positions; a step with a KL term, an entropy bonus,
    two mini-batches and (PPO) a value loss still has finite losses and gradients."""
    counts = []
    for module in (grpo_module, online_module, online_rl_module, ppo_module):
        monkeypatch.setattr(module, "response_forward", poisoned_response_forward(counts))
    extra = dict(beta=0.1, entropy_coef=0.01, num_mini_batches=2) if kind is GRPOModule else dict(entropy_coef=0.01)
    module = stage(kind, sft_export, **extra)
    if kind is PPOModule:
        policy_and_values = module.policy_and_values

        def with_poisoned_values(input_ids, attention_mask, position_ids, response_mask, **kwargs):
            forward, values = policy_and_values(input_ids, attention_mask, position_ids, response_mask, **kwargs)
            return forward, poisoned(values, environment_positions(attention_mask, response_mask))

        module.policy_and_values = with_poisoned_values
    capture = GradientCapture()
    trainer = fit(module, callbacks=[capture])
    assert sum(counts) > 0  # there were environment turns to poison
    logged = {name: float(value) for name, value in trainer.logged_metrics.items()}
    # Explained variance is NaN by definition when every return is equal (these scores may all be 0).
    assert [name for name, value in logged.items() if value != value and name != "val/explained_variance"] == []
    assert capture.gradients and all(torch.isfinite(g).all() for g in capture.gradients.values())
    assert logged["episodes/turns"] > 1


def test_the_first_ratio_is_exactly_one_on_multi_turn_episodes(sft_export, monkeypatch):
    seen = []
    losses = grpo_module.grpo_token_losses

    def recording(logprobs, old_logprobs, advantages, mask, **kw):
        seen.append((logprobs.detach().clone(), old_logprobs.clone(), mask.clone()))
        return losses(logprobs, old_logprobs, advantages, mask, **kw)

    monkeypatch.setattr(grpo_module, "grpo_token_losses", recording)
    fit(stage(GRPOModule, sft_export, num_mini_batches=2))
    logprobs, old, mask = seen[0]
    assert mask.any() and torch.equal(logprobs[mask], old[mask])


def test_first_step_gradients_do_not_depend_on_the_micro_batches(sft_export):
    """16 episodes of 1 to 3 turns as one micro-batch or as 3 accumulated ones: the same episodes
    (played before the split), so the same gradients; Dr. GRPO's constant is the episode budget."""
    gradients = []
    for accumulation in (1, 3):
        capture = GradientCapture()
        fit(stage(GRPOModule, sft_export, gradient_accumulation_steps=accumulation, beta=0.1, loss_type="dr_grpo",
                  rewards=[EnvironmentReward(), RewardFunction(conversation_length)]), callbacks=[capture])
        gradients.append(capture.gradients)
    whole, split = gradients
    assert whole and any(g.abs().sum() > 0 for g in whole.values())
    for name, gradient in whole.items():
        torch.testing.assert_close(split[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_ppo_values_and_advantages_are_zero_on_the_environment_tokens(sft_export, monkeypatch):
    captured = {}
    gae = ppo_module.gae

    def recording(rewards, values, mask, **kw):
        advantages, returns = gae(rewards, values, mask, **kw)
        captured.update(values=values, mask=mask, advantages=advantages, rewards=rewards)
        return advantages, returns

    monkeypatch.setattr(ppo_module, "gae", recording)
    module = stage(PPOModule, sft_export)
    seen = []
    make_rollout = module.make_rollout

    def rollout_of(batch):
        result = make_rollout(batch)
        seen.append(result[0])
        return result

    module.make_rollout = rollout_of
    fit(module)
    env = environment_positions(seen[0].attention_mask, seen[0].response_mask)
    assert env.any()
    for name in ("values", "advantages", "rewards"):
        assert (captured[name][env] == 0).all(), name


def test_episodes_are_logged_with_trls_tool_metrics(sft_export):
    trainer = fit(stage(GRPOModule, sft_export))
    logged = trainer.logged_metrics
    for name in ("episodes/turns", "episodes/tool_calls", "episodes/tool_errors", "episodes/malformed",
                 "episodes/truncated", "episodes/episode_tokens", "tools/call_frequency", "tools/failure_frequency",
                 "rewards/environment/mean", "reward"):
        assert name in logged, name


def test_environment_rewards_no_source_reads_are_refused(sft_export):
    with pytest.raises(ValueError, match="add plpost.rewards.EnvironmentReward"):
        fit(stage(GRPOModule, sft_export, rewards=[RewardFunction(exact_match_reward)]))


def test_settings_that_cannot_work_with_an_environment_are_refused():
    with pytest.raises(ValueError, match="off_policy_correction"):
        stage(GRPOModule, TINY, off_policy_correction="token_truncate")
    with pytest.raises(ValueError, match="give the stage an environment"):
        stage(GRPOModule, TINY, environment=None)


def test_a_tokenizer_that_cannot_read_tool_calls_stops_the_run_before_the_first_step():
    """The bundled tokenizer without its response template, whose calls (<call> JSON) are not Hermes:
    the run stops before any sampling, with the tokenizer named."""
    from plpost.environments import Environment
    from plpost.tasks.calculator import add

    module = stage(GRPOModule, TINY, environment=Environment(tools=[add]), rewards=[RewardFunction(exact_match_reward)])
    data = PromptDataModule(TINY, ROWS, batch_size=4)
    data.tokenizer.response_template = None
    sampled = []
    module.play_episodes = lambda *args: sampled.append(args)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ValueError, match="the tokenizer of .*tiny has no response_template"):
        trainer.fit(module, data)
    assert sampled == []


def test_dynamic_sampling_plays_the_degenerate_groups_again(sft_export):
    """Groups whose episodes all score alike are played again (their rows and statistics replaced),
    then dropped if they stay so; the step trains on what is left."""
    seen = []
    module = stage(GRPOModule, sft_export, rewards=[EnvironmentReward()], dynamic_sampling=True, max_resample_rounds=1)
    generate = module.generate

    def generating(batch):
        groups = generate(batch)
        seen.append(groups)
        return groups

    module.generate = generating
    trainer = fit(module, batch_size=8)
    groups = seen[0]
    assert groups.resampled > 0
    assert groups.episode_statistics["turns"].shape == groups.rewards.shape
    assert groups.samples.response_mask.shape[1] == groups.loss_mask.shape[1]
    assert "dynamic_sampling/filtered" in trainer.logged_metrics
