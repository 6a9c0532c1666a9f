"""What the online reinforcement-learning stages share (PPO, GRPO), on top of the online step of
`plpost.modules.online`: the reward sources that score the samples, the environment that makes
episodes multi-turn, and the KL reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from plpost.data.base import trainer_template
from plpost.environments import Environment
from plpost.episodes import EpisodePlayer, Episodes
from plpost.generation import eager_sampling
from plpost.modules.online import OnlineModule
from plpost.modules.reference import ReferenceModule
from plpost.rewards import EnvironmentReward, RewardFunction, RewardScorer, RewardSource, Responses
from plpost.rewards import responses_of, responses_of_episodes
from plpost.rollout import Samples, response_forward, sampled_completions
from plpost.sharding import full_parameters


def not_scored(prompts: list, completions: list[str], **columns: Any) -> Tensor:
    raise RuntimeError("this module was rebuilt from a checkpoint without its reward sources; it cannot score")


class OnlineRLModule(OnlineModule, ReferenceModule):
    """Base of the online reinforcement-learning stages (PPO, GRPO): reward sources, a KL
    reference (`ReferenceModule`), and an optional environment that makes every episode multi-turn.

    Args:
        rewards: the reward sources, summed with their weights (`plpost.rewards.RewardFunction`
            for a Python function, `plpost.rewards.RewardModel` for a trained reward model folder,
            the verifiable rewards of `plpost.verifiable`).
        environment: makes every episode multi-turn (`plpost.environments.Environment`: Python
            tools, or a world of its own): the policy writes a turn, the environment answers,
            up to its max_turns; only the policy's tokens are trained (`plpost.episodes`). Its
            rewards count through a `plpost.rewards.EnvironmentReward` source; reward functions
            read the last assistant turn as the completion, the episode in the ``conversation`` column.
        missing_eos_penalty: subtracted from the score of a completion with no stop token within
            max_new_tokens (None: no penalty).
        num_mini_batches: optimizer steps per pass over the generation batch, whose rows are split
            into this many (sizes differing by at most one; `plpost.modules.online.micro_batch_layout`).
    """

    reward_scorer: RewardScorer
    environment: Environment | None = None
    episode_player: EpisodePlayer | None = None
    """Plays the environment's episodes; built when a fit starts."""

    def __init__(
        self, *, rewards: list[RewardSource] | None = None, environment: Environment | None = None,
        missing_eos_penalty: float | None = None, num_mini_batches: int = 1, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_mini_batches < 1:
            raise ValueError(f"num_mini_batches must be >= 1, got {num_mini_batches}")
        rewards = rewards or []
        if environment is not None and not isinstance(environment, Environment):
            raise TypeError(f"environment must be a plpost.environments.Environment, got {type(environment).__name__}")
        if environment is None and any(isinstance(source, EnvironmentReward) for source in rewards):
            raise ValueError("an EnvironmentReward source reads an environment's rewards: give the stage an environment")
        self.environment = environment
        self.reward_scorer = RewardScorer(rewards, missing_eos_penalty=missing_eos_penalty, **self.reward_shaping())

    def reward_shaping(self) -> dict[str, Any]:
        """What the stage's own arguments add to the scoring (see `plpost.rewards.RewardScorer`); nothing here."""
        return {}

    @property
    def completion_budget(self) -> int:
        """The most policy tokens after a prompt: max_new_tokens, or every turn of an episode."""
        if self.environment is None:
            return self.hparams.max_new_tokens
        budget = self.environment.max_turns * self.hparams.max_new_tokens
        limit = self.environment.max_episode_tokens
        return budget if limit is None else min(budget, limit)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # Built for each fit, with that fit's data module's chat template; a tokenizer that cannot
        # read tool calls stops the run here, before the first step.
        if self.environment is not None:
            self.episode_player = EpisodePlayer(
                self.environment, trainer_template(self._trainer, self.tokenizer),
                stop_ids=self.sampling_config().eos_token_id, max_new_tokens=self.hparams.max_new_tokens,
                max_positions=getattr(self.policy.config, "max_position_embeddings", None))

    @torch.no_grad()
    def play_episodes(self, prompts: Sequence, columns: dict[str, list[Any]], num_samples: int) -> Episodes:
        """`num_samples` episodes of each prompt with the environment, those of a prompt consecutive,
        each turn sampled as `sample` samples (all turns inside one gathering of sharded weights)."""
        config, pad = self.sampling_config(), self.tokenizer.pad_token_id
        with eager_sampling(), full_parameters(self.generation_model()) as model:
            def sample_turn(input_ids: Tensor, attention_mask: Tensor, n: int) -> Tensor:
                return sampled_completions(model, input_ids, attention_mask, config, pad_token_id=pad, num_samples=n)[0]

            return self.episode_player.play(sample_turn, prompts, columns, num_samples, device=self.device)

    def sample_responses(self, input_ids: Tensor, attention_mask: Tensor, prompts: Sequence,
                         columns: dict[str, list[Any]], num_samples: int = 1, logits_processor: list | None = None,
                         ) -> tuple[Samples, Responses, dict[str, Tensor]]:
        """The samples of these prompts, what the reward sources read of them, and the episode
        statistics (none without an environment)."""
        if self.environment is None:
            samples = self.sample(input_ids, attention_mask, num_samples, logits_processor=logits_processor)
            return samples, responses_of(self.tokenizer, samples, prompts, columns, num_samples), {}
        episodes = self.play_episodes(prompts, columns, num_samples)
        read = any(isinstance(source, EnvironmentReward) for source in self.reward_scorer.sources)
        # Decided over every device, so that all of them stop, not the one whose episodes had a reward.
        if not read and self.trainer.strategy.reduce_boolean_decision(episodes.rewarded, all=False):
            raise ValueError(f"{type(self.environment).__name__} gives rewards, which no reward source reads: add "
                             "plpost.rewards.EnvironmentReward to `rewards` (or give no rewards in its replies)")
        return episodes.samples, responses_of_episodes(episodes, prompts, columns, num_samples), episodes.statistics

    def episode_metrics(self, statistics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per episode means of the statistics of `plpost.episodes`, and TRL's tool frequencies
        (calls per episode, failures per call, over every device)."""
        if not statistics:
            return {}
        calls, failures = (self.global_sum(statistics[name].sum()) for name in ("tool_calls", "tool_errors"))
        episodes = self.global_sum(torch.tensor(float(len(statistics["turns"])), device=self.device))
        return {
            **{f"episodes/{name}": values.mean() for name, values in statistics.items()},
            "tools/call_frequency": calls / episodes, "tools/failure_frequency": failures / calls.clamp(min=1.0),
        }

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict[str, Any]) -> OnlineRLModule:
        # Reward sources are Python objects, kept out of the hyperparameters; a module rebuilt
        # from them to export or chat with its policy never scores, so a source that refuses to
        # score stands in for them.
        return super().from_hyperparameters({"rewards": [RewardFunction(not_scored)], **hyperparameters})

    def build_models(self) -> None:
        super().build_models()
        self.build_value_model()
        self.reward_scorer.setup(self.tokenizer)

    def build_value_model(self) -> None:
        """Builds what the stage trains besides the policy (PPO's value head or critic); nothing here."""

    def reference_logprobs(self, *tensors: Tensor) -> Tensor:
        """(B, R) log-probs of the response tokens under the reference, at the sampling temperature."""
        with self.reference_model() as model:
            return response_forward(model, *tensors, temperature=self.hparams.temperature).logprobs

    def frozen_sources(self) -> dict[str, Any]:
        sources = super().frozen_sources()
        sources.update({f"reward/{s.name}": s.source() for s in self.reward_scorer.sources})
        return sources
