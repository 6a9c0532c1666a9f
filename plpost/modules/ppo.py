"""PPOModule: RLHF with PPO: sample, score, then several clipped updates of policy and value."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification

from plpost.data.prompts import PromptBatch
from plpost.hf import load_causal_lm
from plpost.losses import adaptive_kl_coefficient, clipped_value_loss, gae, kl_penalty, masked_sum, masked_whiten
from plpost.losses import per_token_rewards, ppo_policy_loss
from plpost.modules.building import disable_dropout
from plpost.modules.online import forward_in_layout, per_token
from plpost.modules.online_rl import OnlineRLModule
from plpost.modules.ppo_value import ValueHead, critic_values, zero_where_not
from plpost.rewards import RewardModel
from plpost.rollout import ResponseForward, Rollout, response_forward, rollout_statistics


class PPOModule(OnlineRLModule):
    """PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), one rollout per training step.

    A training step takes a `PromptBatch`, samples one response per prompt, scores it with the
    reward sources, and computes per-token rewards r_t = -kl_coef * KL_t (+ the score on the last
    token), GAE advantages and returns; then `ppo_epochs` passes over the rollout, each split
    into `num_mini_batches` optimizer steps of `gradient_accumulation_steps` micro-batches.
    Losses are per token over the whole mini-batch (all micro-batches, all devices). Optimization
    is manual, so `trainer.global_step` counts optimizer steps (ppo_epochs * num_mini_batches
    per rollout, and `max_steps` too); bound a run in rollouts with `max_epochs` or
    `limit_train_batches`. Logged metrics are per rollout; evaluate held-out prompts with the
    `plpost.callbacks.GenerationEval` callback. Generation runs on the unsharded policy, so the
    strategy must keep whole models on each device (single device, DDP).

    With `model_settings`, the critic gets its own LoRA adapters, and `torch_compile` compiles the
    policy, a "copy" reference and the critic (the rollout's scoring and the updates; sampling stays
    eager). With an environment, GAE runs over the policy's tokens only, the environment's replies
    skipped (`plpost.losses.gae`). The optimizer is given every trainable parameter: the policy's,
    and the value head's or the critic's.

    Besides its own arguments, PPO takes those of `OnlineRLModule` and its bases (`OnlineModule`,
    `ReferenceModule`: reference "auto", "copy" or "adapter", and `PostTrainingModule`).

    Args:
        model: the initial policy (usually the SFT export): Hub name, folder or ``plpost:tiny``.
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        normalize_rewards: standardise scores with their running mean and std.
        reward_clip: clamp scores to [-reward_clip, reward_clip] (None: no clipping).
        value_model: "head": a scalar linear head on the policy's last hidden state (shared
            backbone, one forward for both); "critic": a separate model (`critic_model`).
        critic_model: the critic's initial weights (default: the first `RewardModel` source's
            folder); it must share the policy's tokenizer.
        ppo_epochs: passes over each rollout.
        clip_ratio: PPO's epsilon: the ratio is clipped to [1 - eps, 1 + eps].
        vf_coef: weight of the value loss.
        cliprange_value: how far a value may move from its rollout value before its loss is clipped.
        gamma: discount factor of GAE.
        lam: lambda of GAE.
        whiten_advantages: standardise advantages over the rollout's response tokens.
        entropy_coef: weight of an entropy bonus (0: none, and no entropy is computed).
        kl_coef: the (initial) KL penalty coefficient.
        kl_estimator: "k1": log pi - log pi_ref; "k3": its non-negative, lower-variance variant.
        target_kl: adapt kl_coef towards this KL per response (nats) with the controller of
            Ziegler et al.; None keeps kl_coef fixed.
        kl_horizon: the controller's horizon, in episodes (responses).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        normalize_rewards: bool = False,
        reward_clip: float | None = None,
        value_model: Literal["head", "critic"] = "head",
        critic_model: str | None = None,
        ppo_epochs: int = 4,
        clip_ratio: float = 0.2,
        vf_coef: float = 0.1,
        cliprange_value: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        target_kl: float | None = None,
        kl_horizon: int = 10000,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        if value_model == "critic" and critic_model is None:
            critic_model = next((s.path for s in self.reward_scorer.sources if isinstance(s, RewardModel)), None)
            if critic_model is None:
                raise ValueError("value_model='critic' needs `critic_model` (or a RewardModel source to start from)")
        self.critic_name = critic_model
        self.value_head: ValueHead | None = None
        self.critic: torch.nn.Module | None = None
        # Buffers, so checkpoints carry them: the adaptive KL controller's state and the counters.
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))
        self.register_buffer("rollouts", torch.zeros((), dtype=torch.float64))

    def reward_shaping(self) -> dict[str, Any]:
        return {"normalize": self.hparams.normalize_rewards, "clip": self.hparams.reward_clip}

    # -- models ---------------------------------------------------------------------------
    def build_value_model(self) -> None:
        if self.hparams.value_model == "head":
            self.value_head = ValueHead(self.policy.config.get_text_config().hidden_size)
            return
        # A reward model folder keeps its trained head (a good start: it already tells good
        # responses from bad); a causal LM folder gets a new head on its backbone.
        critic = load_causal_lm(
            self.critic_name, **self.loading_arguments(random_init=False, frozen=False, empty=None),
            auto_class=AutoModelForSequenceClassification, num_labels=1, pad_token_id=self.tokenizer.pad_token_id,
        )
        self.critic = self.prepare_trainable(critic, task_type="SEQ_CLS")
        disable_dropout(self.critic)

    def trained_modules(self) -> list[torch.nn.Module | None]:
        return [self.policy, self.critic, self.value_head]

    def compiled_modules(self) -> list[torch.nn.Module | None]:
        """The policy, the frozen reference and the critic's backbone (which `critic_values` calls).

        Only their scoring and update forwards run compiled: sampling runs eagerly (see
        `plpost.generation.eager_sampling`). Measured on the tiny model, KV-cache decoding through the compiled
        forward compiles three more graphs (empty cache, first decode, cache strides made
        dynamic), doubling the first rollout's compile (27 s to 51 s) to save 26% of generation;
        and every Hugging Face forward shares one code object, so with a critic these reach
        torch's limit of 8 compiled variants, past which any other variant runs eagerly. A LoRA
        policy would generate eagerly anyway: peft's `generate` calls the model under the
        adapter, not the compiled wrapper. Compiled decoding is transformers' static-cache path,
        which plpost's sampling does not use.
        """
        critic = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
        return [self.policy, *self.stage_frozen_models(), critic.base_model if critic is not None else None]

    def policy_and_values(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_mask: Tensor,
        *, with_entropy: bool = False,
    ) -> tuple[ResponseForward, Tensor]:
        """(ResponseForward, (B, R) values): the one forward that the rollout and the update share."""
        forward = response_forward(
            self.policy, input_ids, attention_mask, position_ids, response_mask,
            temperature=self.hparams.temperature, with_entropy=with_entropy, with_hidden=self.value_head is not None,
        )
        if self.value_head is not None:
            values = self.value_head(forward.hidden)
        else:
            values = critic_values(self.critic, input_ids, attention_mask, position_ids, response_mask.shape[1])
        return forward, zero_where_not(response_mask, values)

    def rollout_logprobs_and_values(self, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        forward, values = self.policy_and_values(*tensors)
        return forward.logprobs, values

    # -- rollout --------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, batch: PromptBatch) -> tuple[Rollout, dict[str, Tensor], dict[str, Tensor]]:
        """Samples, then scores: log-probs and values in the update's micro-batch layout; the
        rollout, each source's scores, and the episode statistics (none without an environment)."""
        samples, responses, statistics = self.sample_responses(batch.input_ids, batch.attention_mask, batch.prompts,
                                                               batch.columns)
        tensors = [samples.input_ids, samples.attention_mask, samples.position_ids, samples.response_mask]
        layout = self.layout(len(samples.input_ids), self.hparams.num_mini_batches)
        logprobs, values = forward_in_layout(self.rollout_logprobs_and_values, tensors, layout)
        ref_logprobs = forward_in_layout(self.reference_logprobs, tensors, layout)
        scores = self.reward_scorer(responses, gather=self.all_gather)
        if torch.isnan(scores.scores).any():
            raise ValueError("a reward source returned None (not applicable) for a response, which PPO has no "
                             "baseline to leave it out of; score every response, or use GRPOModule")
        return Rollout(*samples, logprobs, ref_logprobs, values, scores.scores), scores.per_source, statistics

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        rollout, per_source, statistics = self.make_rollout(batch)    # generate, score (no gradients)
        generated = time.perf_counter()
        mask = rollout.response_mask
        kl = zero_where_not(mask, kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator=hp.kl_estimator))
        rewards = per_token_rewards(kl, rollout.scores, mask, kl_coef=float(self.kl_coef))
        advantages, returns = gae(rewards, rollout.values, mask, gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        def micro_batch_loss(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            return self.micro_batch_loss(rollout, advantages, returns, rows)

        def tokens_of_step(rows: Tensor) -> Tensor:                   # per token of the whole optimizer step
            return self.global_sum(mask[rows].sum())

        sums = self.update(len(mask), micro_batch_loss, tokens_of_step, passes=hp.ppo_epochs,
                           num_mini_batches=hp.num_mini_batches)
        sequence_kl = kl.sum(1)
        kl_coef_used = float(self.kl_coef)
        episodes = self.update_kl_coefficient(sequence_kl)
        metrics = {
            **rollout_statistics(rollout, sequence_kl, rewards, returns), "objective/kl_coef": kl_coef_used,
            **{f"rewards/{name}": value.mean() for name, value in per_source.items()}, **per_token(sums),
            **self.episode_metrics(statistics),
        }
        self.log_generation_batch(metrics, shown="objective/scores", episodes=episodes,
                                  generation_s=generated - started, update_s=time.perf_counter() - generated)

    def micro_batch_loss(self, rollout: Rollout, advantages: Tensor, returns: Tensor, rows: Tensor):
        """(summed loss of these rows' tokens, summed statistics)."""
        hp = self.hparams
        mask = rollout.response_mask[rows]
        forward, values = self.policy_and_values(
            rollout.input_ids[rows], rollout.attention_mask[rows], rollout.position_ids[rows], mask,
            with_entropy=hp.entropy_coef > 0,
        )
        policy = ppo_policy_loss(forward.logprobs, rollout.logprobs[rows], advantages[rows], mask, clip_ratio=hp.clip_ratio)
        value = clipped_value_loss(values, rollout.values[rows], returns[rows], mask, clip_range=hp.cliprange_value)
        loss = policy.token_losses.sum() + hp.vf_coef * value.token_losses.sum()
        stats = {
            "tokens": mask.sum().float(), "policy/clipfrac": policy.clipped.sum().float(),
            "policy/approxkl": masked_sum(policy.approx_kl, mask), "policy/ratio": policy.ratio.sum(),
            "loss/policy": policy.token_losses.detach().sum(), "loss/value": value.token_losses.detach().sum(),
            "val/clipfrac": value.clipped.sum().float(),
        }
        if hp.entropy_coef > 0:
            entropy = masked_sum(forward.entropy, mask)
            loss = loss - hp.entropy_coef * entropy
            stats["policy/entropy"] = entropy.detach()
        return loss, stats

    def update_kl_coefficient(self, sequence_kl: Tensor) -> Tensor:
        """Counts the episodes of all devices (returned) and moves kl_coef towards target_kl (if set)
        by their KL."""
        episodes = self.count_episodes(len(sequence_kl))
        self.rollouts += 1
        if self.hparams.target_kl is not None:
            observed = self.global_sum(sequence_kl.sum()) / episodes
            coef = adaptive_kl_coefficient(
                float(self.kl_coef), observed, target=self.hparams.target_kl, horizon=self.hparams.kl_horizon,
                n_steps=int(episodes),
            )
            self.kl_coef.fill_(coef)
        return episodes

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.ppo_epochs * self.hparams.num_mini_batches
