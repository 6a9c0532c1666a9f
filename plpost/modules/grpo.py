"""GRPOModule: critic-free online RL (GRPO, Dr. GRPO, DAPO, BNPO, RLOO, GSPO, CISPO, SAPO, REINFORCE++):
G samples per prompt, each compared with the others of its group instead of with a value model.

Over 300 lines: one stage for nine recipes, a fifth of it the class docstring, the `--help` of its
twenty arguments; the shared step is `plpost.modules.online`, rewards and reference
`plpost.modules.online_rl`, the recipes' helpers `plpost.modules.grpo_recipes`."""

from __future__ import annotations

import time
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from transformers import LogitsProcessorList

from plpost.data.prompts import PromptBatch
from plpost.frozen import ReferenceKind
from plpost.losses import group_advantages, group_statistics, grpo_loss_denominator, grpo_loss_terms
from plpost.losses import grpo_token_losses, kl_penalty, leave_one_out_advantages, loss_scope, masked_sum
from plpost.losses import entropy_bonus_terms
from plpost.losses.grpo import GRPOLossType
from plpost.losses.importance import ImportanceSamplingLevel, OffPolicyMode
from plpost.modules.grpo_recipes import check_recipe, token_advantages, token_weights
from plpost.modules.online import forward_in_layout, per_token
from plpost.modules.online_rl import OnlineRLModule
from plpost.rollout import ResponseForward, Samples, replace_rows, response_forward
from plpost.sampler_logprobs import SampledTokenLogprobs, replace_logprob_rows


class Groups(NamedTuple):
    """One training step's completions: B prompts x G, the G of each prompt in consecutive rows."""

    samples: Samples
    rewards: Tensor
    """(B * G,) scores, NaN where no reward source applies."""
    per_source: dict[str, Tensor]
    loss_mask: Tensor
    """(B * G, R) bool: the response tokens the loss sees (truncated or filtered completions masked)."""
    kept: Tensor
    """(B,) bool: groups kept by dynamic sampling (all True without it)."""
    resampled: int
    """Groups sampled again by dynamic sampling."""
    sampler_logprobs: Tensor | None
    """(B * G, R) the sampler's log-probs of the sampled tokens, with off_policy_correction."""
    episode_statistics: dict[str, Tensor]
    """name -> (B * G,) per episode, with an environment (see `plpost.episodes.Episodes`); else empty."""


class GRPOModule(OnlineRLModule):
    """Group-relative policy optimization (Shao et al. 2024) and its variants, one generation batch
    per training step.

    A training step takes a `PromptBatch` of B prompts, samples G = `num_generations` completions
    of each (on the device that holds the prompt, so a group is never split), scores them with
    the reward sources, turns the rewards into one advantage per completion
    (`plpost.losses.group_advantages` or `leave_one_out_advantages`, over the prompts of every
    device), then takes `num_iterations` passes over the B * G completions, each split into
    `num_mini_batches` optimizer steps of `gradient_accumulation_steps` micro-batches, with the
    clipped objective and the aggregation `loss_type` (see `plpost.losses.grpo`), which gives the
    same loss and gradients whatever the micro-batch, accumulation or device split. Optimization is
    manual: `trainer.global_step` counts optimizer steps; bound a run in generation batches with
    `max_epochs` or `limit_train_batches`. Generation runs on the unsharded policy (single device, DDP).

    The old log-probs come from the same forward, micro-batches and order the first pass uses, so
    the first ratio is exactly 1; when the generation batch takes one optimizer step in all
    (num_iterations = num_mini_batches = 1) they are that pass's own, detached, as TRL does.

    A reward source may return None (NaN) for a completion it does not apply to; a completion no
    source applies to is left out of its group's statistics and gets advantage 0.

    Besides its own arguments, GRPO takes those of `OnlineRLModule` and its bases (`OnlineModule`,
    `ReferenceModule`: reference "auto", "copy" or "adapter", the KL anchor when beta > 0, and
    `PostTrainingModule`).

    Args:
        model: the initial policy (usually the SFT export): Hub name, folder or ``plpost:tiny``.
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        num_generations: G, the completions sampled per prompt (>= 2).
        advantage_estimator: "grpo": (r - group mean) scaled by `scale_rewards`; "rloo": r minus
            the mean of the other G - 1 rewards of its group (RLOO), not scaled;
            "reinforce_plus_plus": REINFORCE++'s per-token returns r - beta * (the k1 KL to the
            reference summed from the token on; with kl_mode "reward"), normalised over every token
            of the generation batch on all devices; "reinforce_plus_plus_baseline": the same of
            r - group mean (`plpost.losses.reinforce_plus_plus_advantages`). Neither is scaled by
            `scale_rewards`, which must then be "none".
        scale_rewards: "group": divide by the group's Bessel-corrected std + 1e-4 (GRPO, TRL);
            "batch": by the std of every reward of the step; "none": do not (Dr. GRPO). Must be
            "none" with "rloo" and REINFORCE++.
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo": how token losses are aggregated ("dr_grpo":
            over completions x max_new_tokens, or with an environment the most policy tokens of an
            episode); "cispo" | "sapo": CISPO's and SAPO's objectives, aggregated as "dapo" and
            "grpo" (TRL's names; see `plpost.losses.grpo_token_losses`).
        importance_sampling_level: "token": one ratio per token; "sequence": GSPO's one ratio per
            completion, exp(mean token log-ratio), clipped as a whole (its paper clips at
            epsilon_low = 3e-4, epsilon_high = 4e-4).
        epsilon_low: the ratio is clipped below at 1 - epsilon_low.
        epsilon_high: and above at 1 + epsilon_high (DAPO's clip-higher: 0.28; default: epsilon_low).
            With "cispo", the cap of the importance weight itself (ScaleRL: 5.0), which must be > 1.
        sapo_temperature_pos: SAPO's gate temperature for A > 0.
        sapo_temperature_neg: SAPO's gate temperature for A <= 0.
        top_entropy_quantile: rho, train only the tokens whose entropy is in the top rho of the
            generation batch's (all devices; under the sampling policy): "Beyond the 80/20 rule"
            recommends 0.2. 1.0: every token.
        entropy_coef: weight of the entropy bonus, -coef * the mean token entropy of each optimizer
            step's trained tokens (the full next-token distribution's entropy, with its gradient).
        off_policy_correction: weight each token's policy loss by pi_old / pi_sampler, the trainer's
            probability over the sampler's (`generate` with its KV cache and top_p / top_k), token
            or sequence level, truncated (TIS) or masked (MIS): "token_truncate" | "token_mask" |
            "sequence_truncate" | "sequence_mask"; None: off. The mismatch is logged in any case
            when set (sampling/sampling_logp_difference/*, sampling/importance_sampling_ratio/*).
        off_policy_clip_min: the lower bound of the weights (TRL's vllm_importance_sampling_clip_min).
        off_policy_clip_max: their upper bound (TRL's vllm_importance_sampling_clip_max).
        num_iterations: passes over each generation batch (GRPO's mu).
        beta: weight of the KL to the frozen reference (0: no reference is loaded at all).
        kl_mode: "loss": beta * the k3 estimator per token in the loss (GRPO's paper, TRL);
            "reward": beta * the summed k1 estimator subtracted from each completion's reward.
        mask_truncated_completions: leave completions that hit max_new_tokens without a stop token
            out of the loss (DAPO's overlong filtering); they still count in the reward statistics.
        dynamic_sampling: drop groups whose rewards are all equal (no signal: every advantage is
            0), sampling them again first up to `max_resample_rounds` times (DAPO). Dropped groups
            stay in the batch with their tokens masked out of the loss and its normalisation.
        max_resample_rounds: how many times the degenerate groups are sampled again.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        num_generations: int = 8,
        advantage_estimator: Literal["grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"] = "grpo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        loss_type: GRPOLossType = "dapo",
        importance_sampling_level: ImportanceSamplingLevel = "token",
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
        off_policy_correction: OffPolicyMode | None = None,
        off_policy_clip_min: float | None = None,
        off_policy_clip_max: float | None = 3.0,
        num_iterations: int = 1,
        beta: float = 0.0,
        kl_mode: Literal["loss", "reward"] = "loss",
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = False,
        max_resample_rounds: int = 2,
        **kwargs: Any,
    ) -> None:
        if epsilon_high is None:
            epsilon_high = epsilon_low
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        loss_scope(loss_type)  # refuses an unknown loss_type now, not at the first step
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group of one has no baseline), got {num_generations}")
        check_recipe(self.hparams)
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if beta < 0 or epsilon_low < 0 or epsilon_high < 0:
            raise ValueError("beta, epsilon_low and epsilon_high must be >= 0")
        if self.environment is not None and off_policy_correction is not None:
            raise ValueError("off_policy_correction records the sampler's log-probs of one turn; with an environment "
                             "the episodes are multi-turn: leave off_policy_correction unset")

    def choose_reference(self, kind: ReferenceKind, reference_model: str | None, *, allowed: tuple[str, ...]) -> None:
        # beta = 0: no KL term, so no reference at all, whatever `reference` says.
        if not self.hparams.beta > 0:
            kind, allowed = "none", ("none",)
        super().choose_reference(kind, reference_model, allowed=allowed)

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.num_iterations * self.hparams.num_mini_batches

    # -- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_and_score(self, batch: PromptBatch, prompts: Tensor):
        """G completions of each of the `prompts` (indices into the batch), their scores, and the
        sampler's log-probs of their tokens (None without off-policy correction)."""
        hp = self.hparams
        G = hp.num_generations
        recorder = None
        if hp.off_policy_correction is not None:
            recorder = SampledTokenLogprobs(temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
        chosen = prompts.tolist()
        columns = {key: [values[i] for i in chosen] for key, values in batch.columns.items()}
        samples, responses, statistics = self.sample_responses(
            batch.input_ids[prompts], batch.attention_mask[prompts], [batch.prompts[i] for i in chosen], columns, G,
            logits_processor=LogitsProcessorList([recorder]) if recorder is not None else None)
        sampler_logprobs = None
        if recorder is not None:
            sampler_logprobs = recorder.finish(samples.input_ids, samples.response_mask.shape[1])
        scores = self.reward_scorer(responses)
        return samples, scores.scores, scores.per_source, sampler_logprobs, statistics

    def generate(self, batch: PromptBatch) -> Groups:
        """Samples and scores G completions per prompt; with dynamic sampling, samples the groups
        with equal rewards again and drops those that stay so. Every device takes the same rounds,
        as long as any device has such a group (one all-reduce decides each round): sampling
        sharded gathers the weights, a collective, so a device with nothing to sample again joins
        the gathering without generating."""
        hp = self.hparams
        G, prompts = hp.num_generations, len(batch.prompts)
        samples, rewards, per_source, sampler_logprobs, statistics = self.sample_and_score(batch, torch.arange(prompts))
        resampled = 0
        degenerate = group_statistics(rewards, G).std == 0
        for _ in range(hp.max_resample_rounds if hp.dynamic_sampling else 0):
            if not self.trainer.strategy.reduce_boolean_decision(bool(degenerate.any()), all=False):
                break
            if not degenerate.any():
                self.join_sampling()
                continue
            groups = degenerate.nonzero().squeeze(1).cpu()
            rows = (groups[:, None] * G + torch.arange(G)).reshape(-1).to(rewards.device)
            new_samples, new_rewards, new_per_source, new_sampler_logprobs, new_statistics = self.sample_and_score(
                batch, groups)
            samples = replace_rows(samples, rows, new_samples, pad_token_id=self.tokenizer.pad_token_id)
            if sampler_logprobs is not None:
                sampler_logprobs = replace_logprob_rows(sampler_logprobs, rows, new_sampler_logprobs)
            rewards[rows] = new_rewards
            for name, values in new_per_source.items():
                per_source[name][rows] = values
            for name, values in new_statistics.items():
                statistics[name][rows] = values
            resampled += len(groups)
            degenerate = group_statistics(rewards, G).std == 0
        kept = ~degenerate if hp.dynamic_sampling else torch.ones_like(degenerate)
        loss_mask = samples.response_mask & kept.repeat_interleave(G)[:, None]
        if hp.mask_truncated_completions:
            loss_mask = loss_mask & samples.stopped[:, None]
        return Groups(samples, rewards, per_source, loss_mask, kept, resampled, sampler_logprobs, statistics)

    def advantages(self, rewards: Tensor, mask: Tensor, token_kl: Tensor | None = None) -> Tensor:
        """(B * G,) advantages, computed over the rewards of every device (so "batch" scaling is the
        same however many devices share the prompts), this device's slice returned; REINFORCE++'s
        are (B * G, R), per token of `mask`, with `token_kl` (k1, kl_mode "reward") in the returns."""
        hp = self.hparams
        everything = self.all_gather(rewards).reshape(-1)
        if hp.advantage_estimator == "rloo":
            advantages = leave_one_out_advantages(everything, hp.num_generations)
        elif hp.advantage_estimator == "reinforce_plus_plus":
            advantages = everything  # the score itself; normalised over the tokens below
        else:
            scaling = "none" if hp.advantage_estimator == "reinforce_plus_plus_baseline" else hp.scale_rewards
            advantages = group_advantages(everything, hp.num_generations, scale_rewards=scaling)
        start = self.trainer.global_rank * len(rewards)
        advantages = advantages[start : start + len(rewards)]
        if not hp.advantage_estimator.startswith("reinforce_plus_plus"):
            return advantages
        scores = torch.where(torch.isnan(rewards), rewards, advantages)  # no reward: out of the statistics
        return token_advantages(scores, mask, token_kl, beta=hp.beta, global_sum=self.global_sum)

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp = self.hparams
        started = time.perf_counter()
        groups = self.generate(batch)                                     # sample, score (no gradients)
        old_logprobs, ref_logprobs, entropies = self.old_and_reference_logprobs(groups.samples)
        rewards, kl_reward, token_kl = groups.rewards, None, None
        reinforce = hp.advantage_estimator.startswith("reinforce_plus_plus")
        if hp.beta > 0 and hp.kl_mode == "reward":                        # k1, summed per completion
            token_kl = kl_penalty(old_logprobs, ref_logprobs)
            kl_reward = masked_sum(token_kl, groups.samples.response_mask, dim=1)
            if not reinforce:  # REINFORCE++ puts it in each token's return instead
                rewards = rewards - hp.beta * kl_reward
        advantages = self.advantages(rewards, groups.loss_mask, token_kl)
        weights, recipe_stats = self.token_weights(groups.loss_mask, old_logprobs, groups.sampler_logprobs, entropies)
        generated = time.perf_counter()
        mask = groups.loss_mask
        bonus_mask = self.bonus_mask(mask, weights)
        step = {}  # the optimizer step's entropy-bonus normaliser, set before its micro-batches

        def tokens_denominator(rows: Tensor | slice) -> Tensor:
            return self.global_sum(grpo_loss_denominator(mask[rows], loss_type=hp.loss_type,
                                                         max_completion_length=self.completion_budget))

        # Scoped to the generation batch, the normaliser is one number for all its steps: reduced once.
        whole_batch = tokens_denominator(slice(None)) if loss_scope(hp.loss_type) == "generation_batch" else None

        def denominator(rows: Tensor) -> Tensor:
            normaliser = whole_batch if whole_batch is not None else tokens_denominator(rows)
            step["policy"], step["bonus"] = normaliser.clamp(min=1.0), self.global_sum(bonus_mask[rows].sum()).clamp(min=1.0)
            return normaliser

        def micro_batch_loss(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            numerator, bonus, stats = self.micro_batch_loss(groups, advantages, old_logprobs, ref_logprobs, rows,
                                                            weights, bonus_mask)
            # update divides by the policy normaliser: the bonus, divided by its own, is scaled to match.
            return numerator + hp.entropy_coef * bonus * step["policy"] / step["bonus"], stats

        sums = self.update(len(mask), micro_batch_loss, denominator, passes=hp.num_iterations,
                           num_mini_batches=hp.num_mini_batches)
        episodes = self.count_episodes(len(rewards))
        self.log_groups(groups, {**per_token(sums), **recipe_stats}, kl_reward, episodes=episodes,
                        generation_s=generated - started, update_s=time.perf_counter() - generated)

    @torch.no_grad()
    def old_and_reference_logprobs(self, samples: Samples):
        """(B * G, R) log-probs of the sampling policy (None when the update's own first forward is
        the only one before any optimizer step), of the reference (None with beta = 0), and the
        sampling policy's token entropies (for top_entropy_quantile < 1, else None), each from one
        forward per micro-batch of the first pass's layout."""
        hp = self.hparams
        with_entropy = hp.top_entropy_quantile < 1.0
        needs_old = (hp.num_iterations > 1 or hp.num_mini_batches > 1 or (hp.beta > 0 and hp.kl_mode == "reward")
                     or with_entropy or hp.off_policy_correction is not None)
        tensors = (samples.input_ids, samples.attention_mask, samples.position_ids, samples.response_mask)
        layout = self.layout(len(samples.input_ids), hp.num_mini_batches)
        old = entropies = None
        if with_entropy:
            old, entropies = forward_in_layout(lambda *t: tuple(self.policy_forward(*t, with_entropy=True)[:2]),
                                               tensors, layout)
        elif needs_old:
            old = forward_in_layout(self.policy_logprobs, tensors, layout)
        reference = forward_in_layout(self.reference_logprobs, tensors, layout) if hp.beta > 0 else None
        return old, reference, entropies

    def policy_forward(self, *tensors: Tensor, with_entropy: bool = False) -> ResponseForward:
        return response_forward(self.policy, *tensors, temperature=self.hparams.temperature, with_entropy=with_entropy)

    def token_weights(self, mask: Tensor, old: Tensor | None, sampler: Tensor | None, entropies: Tensor | None):
        """See `plpost.modules.grpo_recipes.token_weights`; the entropy threshold over every device."""
        return token_weights(self.hparams, mask, old, sampler, entropies, gather=self.all_gather)

    def bonus_mask(self, mask: Tensor, token_weights: Tensor | None) -> Tensor:
        """The tokens the entropy bonus acts on: those the policy loss trains (the top-entropy ones)."""
        if self.hparams.top_entropy_quantile < 1.0 and token_weights is not None:
            return mask & (token_weights > 0)
        return mask

    def micro_batch_loss(self, groups: Groups, advantages: Tensor, old: Tensor | None, ref: Tensor | None, rows,
                         token_weights: Tensor | None, bonus_mask: Tensor):
        """(this micro-batch's numerator of the aggregated loss, its entropy bonus numerator over
        `bonus_mask` (0 with entropy_coef = 0), summed token statistics)."""
        hp = self.hparams
        samples, mask = groups.samples, groups.loss_mask[rows]
        forward = self.policy_forward(*(tensor[rows] for tensor in (
            samples.input_ids, samples.attention_mask, samples.position_ids, samples.response_mask)),
            with_entropy=hp.entropy_coef > 0)
        logprobs = forward.logprobs
        out = grpo_token_losses(
            logprobs, old[rows] if old is not None else logprobs.detach(), advantages[rows], mask,
            epsilon_low=hp.epsilon_low, epsilon_high=hp.epsilon_high,
            ref_logprobs=ref[rows] if ref is not None and hp.kl_mode == "loss" else None, beta=hp.beta,
            loss_type=hp.loss_type, importance_sampling_level=hp.importance_sampling_level,
            sapo_temperature_pos=hp.sapo_temperature_pos, sapo_temperature_neg=hp.sapo_temperature_neg,
            token_weights=token_weights[rows] if token_weights is not None else None,
        )
        terms = grpo_loss_terms(out.token_losses, mask, loss_type=hp.loss_type,
                                max_completion_length=self.completion_budget)
        bonus = torch.zeros((), device=mask.device)
        if forward.entropy is not None:
            bonus = entropy_bonus_terms(forward.entropy, bonus_mask[rows]).numerator
        # The full distribution's entropy when the forward computed it, else -log pi of the sampled tokens (an estimate).
        entropy = forward.entropy.detach() if forward.entropy is not None else -logprobs.detach()
        stats = {
            "tokens": mask.sum().float(), "clip_ratio/low_mean": out.clipped_low.sum().float(),
            "clip_ratio/high_mean": out.clipped_high.sum().float(), "entropy": masked_sum(entropy, mask),
        }
        if out.kl is not None:
            stats["kl"] = masked_sum(out.kl.detach(), mask)
        return terms.numerator, bonus, stats


    def log_groups(self, groups: Groups, update: dict[str, Tensor], kl_reward: Tensor | None, **timing) -> None:
        """Per generation batch, under TRL's names where it has them."""
        hp = self.hparams
        samples, G = groups.samples, hp.num_generations
        stats = group_statistics(groups.rewards, G)
        lengths = samples.response_mask.sum(1).float()
        metrics = {
            "reward": groups.rewards.nanmean(), "reward_std": stats.std.mean(),
            "frac_reward_zero_std": (stats.std == 0).float().mean(),
            **{f"rewards/{name}/mean": values.nanmean() for name, values in groups.per_source.items()},
            "completions/mean_length": lengths.mean(), "completions/clipped_ratio": (~samples.stopped).float().mean(),
            **self.episode_metrics(groups.episode_statistics), **update,
            "clip_ratio/region_mean": update["clip_ratio/low_mean"] + update["clip_ratio/high_mean"],
        }
        if kl_reward is not None:
            metrics["kl"] = kl_reward.sum() / lengths.sum().clamp(min=1.0)  # k1 per token
        if hp.dynamic_sampling:
            metrics["dynamic_sampling/filtered"] = (~groups.kept).float().mean()
            metrics["dynamic_sampling/resampled"] = groups.resampled / len(groups.kept)
        self.log_generation_batch(metrics, shown="reward", **timing)
