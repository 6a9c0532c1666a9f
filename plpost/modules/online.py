"""What the online stages share (PPO, GRPO, distillation): sampling from the policy, and one
training step on what was sampled: the micro-batch layout, gradient accumulation, clipping, the
optimizer and scheduler steps, and the episode metrics and timings; each stage gives its loss.
The reinforcement-learning ones (PPO, GRPO) also share their reward sources, environment and KL
reference (`plpost.modules.online_rl`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from plpost.data.prompts import PromptDataModule
from plpost.generation import eager_sampling, generation_config
from plpost.modules.base import PostTrainingModule
from plpost.modules.building import disable_dropout
from plpost.rollout import Samples, response_forward, sample_responses
from plpost.sharding import full_parameters

Layout = list[list[Tensor]]
"""Rows of a generation batch as optimizer steps (outer) of micro-batches (inner), each a (n,) index tensor."""
MicroBatchLoss = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]
"""rows -> (the loss numerator summed over these rows, statistics summed over them, "tokens" among them)."""


def micro_batch_layout(order: Tensor, num_mini_batches: int, accumulation_steps: int) -> Layout:
    """Rows `order` as `num_mini_batches` optimizer steps of `accumulation_steps` micro-batches,
    consecutive in `order`, sizes differing by at most one (any number of rows that can fill them)."""
    if len(order) < num_mini_batches * accumulation_steps:
        raise ValueError(f"{len(order)} rows cannot fill num_mini_batches * gradient_accumulation_steps = "
                         f"{num_mini_batches * accumulation_steps} micro-batches: sample more per step, or lower these")
    return [list(mini.tensor_split(accumulation_steps)) for mini in order.tensor_split(num_mini_batches)]


def forward_in_layout(fn: Callable[..., Tensor | tuple[Tensor, ...]], tensors: Sequence[Tensor], layout: Layout):
    """fn(*rows) over each micro-batch of `layout` in order, concatenated along dim 0 (each tensor
    of a tuple on its own). The update's first pass runs over the same micro-batches, so the two
    see bitwise-identical inputs and the first ratio is exactly 1."""
    parts = [fn(*(t[rows] for t in tensors)) for mini in layout for rows in mini]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts, dim=0)
    return tuple(torch.cat(column, dim=0) for column in zip(*parts))


def per_token(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Summed statistics divided by their summed "tokens" (at least 1)."""
    tokens = sums["tokens"].clamp(min=1.0)
    return {name: value / tokens for name, value in sums.items() if name != "tokens"}


class OnlineModule(PostTrainingModule):
    """Base of the stages that train on their own samples, with manual optimization.

    Subclasses say how many optimizer steps one training step (one generation batch) takes in
    `optimizer_steps_per_batch`, and train with `update`.

    Args:
        max_new_tokens: the longest sampled completion (with an environment, the longest turn).
        temperature: sampling temperature (> 0); log-probs are taken at the same temperature.
        top_p: nucleus sampling threshold (1.0: off).
        top_k: sample among the k most likely tokens (0: off).
        gradient_accumulation_steps: micro-batches per optimizer step.
        gradient_clip_val: clip the gradient norm of each optimizer step (None: off). Given here,
            not to the Trainer, which does not clip under manual optimization.
    """

    data_modules = (PromptDataModule,)
    samples_while_training = True

    def __init__(
        self, *, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        gradient_accumulation_steps: int = 1, gradient_clip_val: float | None = 1.0, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.register_buffer("episodes", torch.zeros((), dtype=torch.float64))  # in checkpoints
        self.automatic_optimization = False

    @property
    def optimizer_steps_per_batch(self) -> int:
        raise NotImplementedError

    # -- sampling -------------------------------------------------------------------------
    def sampling_config(self) -> GenerationConfig:
        hp = self.hparams
        return generation_config(
            self.tokenizer, do_sample=True, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k,
            max_new_tokens=hp.max_new_tokens, use_cache=True,
        )

    @torch.no_grad()
    def sample(self, input_ids: Tensor, attention_mask: Tensor, num_samples: int = 1,
               logits_processor: list | None = None) -> Samples:
        """`num_samples` responses per left-padded prompt (B, P), those of a prompt consecutive:
        (B * num_samples) rows, sampled eagerly (see `plpost.generation.eager_sampling`) by the
        sampler (`plpost.sampling`: one prefill per prompt). logits_processor: for `generate`'s loop
        (see `plpost.rollout.sample_responses`)."""
        # Sharded (FSDP2), every rank gathers the full weights once for the whole sampling call.
        with eager_sampling(), full_parameters(self.generation_model()) as model:
            return sample_responses(model, input_ids, attention_mask, self.sampling_config(),
                                    pad_token_id=self.tokenizer.pad_token_id, num_samples=num_samples,
                                    logits_processor=logits_processor)

    def build_models(self) -> None:
        super().build_models()
        # Two forwards of the same weights must agree exactly (the first ratio, the KL), as in TRL.
        disable_dropout(self.policy)

    def join_sampling(self) -> None:
        """Takes part in a round of sampling that other devices generate in, generating nothing
        here: the gathering and freeing of the sharded weights are collectives every rank joins."""
        with full_parameters(self.generation_model()):
            pass

    def policy_logprobs(self, *tensors: Tensor) -> Tensor:
        """(B, R) log-probs of the response tokens under the policy, at the sampling temperature."""
        return response_forward(self.policy, *tensors, temperature=self.hparams.temperature).logprobs

    # -- the training step ----------------------------------------------------------------
    def layout(self, rows: int, num_mini_batches: int = 1, order: Tensor | None = None) -> Layout:
        """The generation batch's `rows` (in `order`, default as sampled) as `num_mini_batches`
        optimizer steps of `gradient_accumulation_steps` micro-batches: the one rule of every online stage."""
        order = torch.arange(rows, device=self.device) if order is None else order
        return micro_batch_layout(order, num_mini_batches, self.hparams.gradient_accumulation_steps)

    def update(
        self, rows: int, micro_batch_loss: MicroBatchLoss, denominator: Callable[[Tensor], Tensor], *,
        passes: int = 1, num_mini_batches: int = 1,
    ) -> dict[str, Tensor]:
        """`passes` over the generation batch's `rows`, each `num_mini_batches` optimizer steps (see
        `layout`); returns the micro-batches' statistics summed over every pass.

        Each micro-batch's numerator is divided by `denominator(rows of its optimizer step)`, the
        normaliser of that whole step on every device (at least 1: a step with nothing to train has
        numerators of 0, a zero gradient, not 0 / 0), and scaled by `loss_scale`, so the gradient is
        the same whatever the micro-batch, accumulation or device split. The first pass keeps the
        sampled order, the layout the old log-probs were computed in (same rows, same shapes: the
        ratio is exactly 1 until the first optimizer step); each later pass draws a new order.
        """
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for index in range(passes):
            order = None if index == 0 else torch.randperm(rows).to(self.device)
            for mini in self.layout(rows, num_mini_batches, order):
                normaliser = denominator(torch.cat(mini)).clamp(min=1.0)
                for micro_rows in mini:
                    numerator, stats = micro_batch_loss(micro_rows)
                    self.manual_backward(numerator / normaliser * self.loss_scale())
                    for name, value in stats.items():
                        sums[name] += value
                clip = self.hparams.gradient_clip_val
                if clip is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad()
                if scheduler is not None:
                    scheduler.step()
        return sums

    def count_episodes(self, local: int) -> Tensor:
        """Adds this generation batch's episodes on every device to `episodes`; returns their number."""
        episodes = self.global_sum(torch.tensor(float(local), device=self.device))
        self.episodes += episodes.to(self.episodes.dtype)
        return episodes

    def log_generation_batch(
        self, metrics: dict[str, Tensor | float], *, shown: str, episodes: Tensor, generation_s: float,
        update_s: float,
    ) -> None:
        """Logs one generation batch's `metrics` (averaged over devices) with the timings and
        episode counts every online stage logs, `shown` in the progress bar."""
        metrics = {
            **metrics, "time/generation_s": generation_s, "time/update_s": update_s,
            "perf/episodes_per_s": episodes / (generation_s + update_s), "train/episodes": self.episodes.float(),
        }
        shown_value = metrics.pop(shown)
        # Python numbers go in as they are: Lightning makes them tensors on this module's device, as
        # the collective of sync_dist needs (a CPU tensor would not reduce over NCCL).
        self.log_dict({k: v.float() if isinstance(v, Tensor) else float(v) for k, v in metrics.items()}, sync_dist=True)
        self.log(shown, shown_value.float() if isinstance(shown_value, Tensor) else float(shown_value), prog_bar=True,
                 sync_dist=True)
        self.log_learning_rate()

    # -- the schedule ---------------------------------------------------------------------
    def scheduled_steps(self) -> int:
        # Lightning's estimate of stepping batches counts generation batches under manual
        # optimization, not optimizer steps.
        trainer = self.trainer
        batches = trainer.num_training_batches * max(trainer.max_epochs or 1, 1)
        if trainer.max_epochs == -1 or batches == float("inf"):
            return trainer.max_steps
        total = int(batches) * self.optimizer_steps_per_batch
        return min(total, trainer.max_steps) if trainer.max_steps != -1 else total
