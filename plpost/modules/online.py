"""What the online stages share: sampling from the policy and optimizer steps counted per generation
batch (PPO, GRPO, distillation); and, for the reinforcement-learning ones (PPO, GRPO), the frozen
reference they measure KL against and their frozen reward sources."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from plpost.data.prompts import PromptDataModule
from plpost.generation import eager_sampling, generation_config
from plpost.modules.base import PostTrainingModule
from plpost.modules.reference import FrozenCopy, adapter_disabled, model_fingerprint, starting_copy
from plpost.optim import WarmupCosineLR
from plpost.rewards import RewardFunction, RewardScorer
from plpost.rollout import Samples, response_forward, sample_responses
from plpost.sharding import full_parameters


def not_scored(prompts: list, completions: list[str], **columns: Any) -> Tensor:
    raise RuntimeError("this module was rebuilt from a checkpoint without its reward sources; it cannot score")


class OnlineModule(PostTrainingModule):
    """Base of the stages that train on their own samples, with manual optimization.

    Subclasses keep `temperature`, `top_p`, `top_k` and `max_new_tokens` in their hyperparameters,
    and say how many optimizer steps one training step (one generation batch) takes in
    `optimizer_steps_per_batch`.
    """

    data_modules = (PromptDataModule,)
    samples_while_training = True

    @property
    def optimizer_steps_per_batch(self) -> int:
        raise NotImplementedError

    # -- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, input_ids: Tensor, attention_mask: Tensor, num_samples: int = 1,
               logits_processor: list | None = None) -> Samples:
        """`num_samples` responses per left-padded prompt (B, P), those of a prompt consecutive:
        (B * num_samples) rows, sampled eagerly (see `plpost.generation.eager_sampling`).
        logits_processor: passed to `generate` (see `plpost.rollout.sample_responses`)."""
        hp = self.hparams
        config = generation_config(
            self.tokenizer, do_sample=True, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k,
            max_new_tokens=hp.max_new_tokens, use_cache=True,
        )
        if num_samples > 1:
            input_ids = input_ids.repeat_interleave(num_samples, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        # Sharded (FSDP2), every rank gathers the full weights once for the whole generate.
        with eager_sampling(), full_parameters(self.generation_model()) as model:
            return sample_responses(model, input_ids, attention_mask, config, pad_token_id=self.tokenizer.pad_token_id,
                                    logits_processor=logits_processor)

    def join_sampling(self) -> None:
        """Takes part in a round of sampling that other devices generate in, generating nothing
        here: the gathering and freeing of the sharded weights are collectives every rank joins."""
        with full_parameters(self.generation_model()):
            pass

    # -- optimizer steps ------------------------------------------------------------------
    def configure_optimizers(self):
        config = super().configure_optimizers()
        scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
        # The base class sizes the schedule with Lightning's estimate of stepping batches, which
        # under manual optimization counts generation batches, not optimizer steps.
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps == int(self.trainer.estimated_stepping_batches):
            scheduler.total_steps = self.estimated_optimizer_steps()
        return config

    def estimated_optimizer_steps(self) -> int:
        trainer = self.trainer
        batches = trainer.num_training_batches * max(trainer.max_epochs or 1, 1)
        if trainer.max_epochs == -1 or batches == float("inf"):
            return trainer.max_steps
        total = int(batches) * self.optimizer_steps_per_batch
        return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


class OnlineRLModule(OnlineModule):
    """Base of the online reinforcement-learning stages (PPO, GRPO): reward sources and a KL reference.

    Subclasses set `reward_scorer`, `reference_name`, `use_adapter_reference` and `reference`
    (None until `build_reference`) in `__init__`.
    """

    frozen_modules = ("reference", "reward_scorer.sources")
    reward_scorer: RewardScorer
    reference: FrozenCopy | None
    reference_name: str
    use_adapter_reference: bool

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict[str, Any]) -> OnlineRLModule:
        # Reward sources are Python objects, kept out of the hyperparameters; a module rebuilt
        # from them to export or chat with its policy never scores, so a source that refuses to
        # score stands in for them.
        return super().from_hyperparameters({"rewards": [RewardFunction(not_scored)], **hyperparameters})

    # -- models ---------------------------------------------------------------------------
    def build_reference(self, initial: PreTrainedModel) -> None:
        """A frozen copy of the reference's weights, unless the reference is the disabled adapter.

        The policy's own initial weights are copied when they are the reference (also right for
        random_init, where loading again would draw different weights).
        """
        if self.use_adapter_reference:
            return
        same = self.reference_name == self.model_name
        frozen_dtype = self.weights_dtype(frozen=True)
        reference = (starting_copy(initial, frozen_dtype) if same
                     else self.load_pretrained(self.reference_name, random_init=False, frozen=True))
        self.reference = FrozenCopy(reference, self.reference_name)

    def reference_logprobs(self, *tensors: Tensor) -> Tensor:
        """(B, R) log-probs of the response tokens under the reference, at the sampling temperature."""
        reference = nullcontext(self.reference) if self.reference is not None else adapter_disabled(self.policy)
        with reference as model:
            return response_forward(model, *tensors, temperature=self.hparams.temperature).logprobs

    def frozen_sources(self) -> dict[str, Any]:
        sources = {}
        if self.reference is not None:
            sources["reference"] = model_fingerprint(self.reference_name)
        elif self.use_adapter_reference:
            sources["reference"] = "the policy without its adapter"
        sources.update({f"reward/{s.name}": s.source() for s in self.reward_scorer.sources})
        return sources
