"""KTOModule: Kahneman-Tversky optimisation on unpaired feedback (thumbs up / down on single answers)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from plpost.data.feedback import FeedbackBatch, FeedbackDataModule
from plpost.losses import KTOLoss, kto_loss, kto_reference_point
from plpost.modules.dpo import metric_key
from plpost.modules.preference_base import PreferenceModule
from plpost.modules.preference_logps import completion_logps

KTO_METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
"""Logged as train/<name> and val/<name> (with rewards/margins), the names TRL's KTOTrainer uses:
chosen = desirable, rejected = undesirable, each averaged over the examples of its kind."""


class CompletionMismatched(NamedTuple):
    """(N,) summed log-probs of each example's completion and of its mismatched completion."""

    completion: Tensor
    mismatched: Tensor


class KTOModule(PreferenceModule):
    """KTO (Ethayarajh et al. 2024) of a policy on `FeedbackBatch`es against a frozen reference.

    Each example's loss is `plpost.losses.kto_loss`: its log-ratio against the reference point
    z0, weighted by desirable_weight or undesirable_weight. The loss of an optimizer step is the
    sum of the example losses divided by the examples of the whole step (all micro-batches and
    devices), the same whatever the micro-batch size, accumulation or device count.

    The reference point z0 of a micro-batch is max(0, mean log-ratio of its examples' mismatched
    completions), detached. Each example's mismatched completion is fixed by the data (see
    `FeedbackDataModule`: the next completion of another prompt), so any sampling order and any
    micro-batch size (1 included) give a true mismatch, and "precomputed" can store its reference
    log-prob. With several devices, the log-ratio sums and counts are all-reduced first: every
    device uses the mean over all the step's micro-batches at that position, the same z0.
    Under gradient accumulation each micro-batch has its own z0 (the later micro-batches are not
    computed yet), as in TRL. TRL 1.16 instead builds the mismatch by rotating completions
    within each per-device batch of the dataset, which is why it needs sequential sampling and
    a per-device batch above 1, and averages the per-device means.

    A "precomputed" reference stores the log-probs of every example and of its mismatched
    completion. Besides its own arguments, KTO takes those of `PreferenceModule` and its bases
    (`ReferenceModule`: reference "auto", "copy", "adapter" or "precomputed", and `PostTrainingModule`).

    Args:
        model: Hub name, local folder, or bundled name (``plpost:tiny``) of the causal LM to
            train; usually the SFT model.
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        desirable_weight: the weight of the desirable examples' losses.
        undesirable_weight: the weight of the undesirable examples' losses. The paper suggests
            desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3].
    """

    data_modules = (FeedbackDataModule,)
    logps_type = CompletionMismatched

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        one = torch.zeros(1)  # kto_loss validates beta and the weights
        kto_loss(one, one, one.bool(), one[0], beta=self.hparams.beta, desirable_weight=desirable_weight,
                 undesirable_weight=undesirable_weight)
        self.val_metrics = nn.ModuleDict({metric_key(name): MeanMetric() for name in KTO_METRICS})

    def model_logps(self, model: nn.Module, batch: FeedbackBatch, layout: None = None) -> CompletionMismatched:
        completion = completion_logps(model, batch.completions)
        with torch.no_grad():  # the mismatched rows only feed z0, which is detached
            mismatched = completion_logps(model, batch.mismatched)
        return CompletionMismatched(completion, mismatched)

    def example_index(self, batch: FeedbackBatch) -> Tensor:
        return batch.example_index

    def reference_point(self, policy: CompletionMismatched, reference: CompletionMismatched) -> Tensor:
        """z0 of this micro-batch, from the mismatched log-ratios of every device (summed, then averaged)."""
        totals = torch.stack([(policy.mismatched - reference.mismatched).sum(),
                              policy.mismatched.new_tensor(float(len(policy.mismatched)))])
        if self._trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return kto_reference_point(totals[0], totals[1])

    def example_losses(self, batch: FeedbackBatch, split: str) -> tuple[KTOLoss, dict[str, Tensor]]:
        """Per-example losses (N,), and the metrics: name -> the per-example values it averages."""
        h = self.hparams
        policy, reference = self.model_logps(self.policy, batch), self.reference_logps(batch, split)
        z0 = self.reference_point(policy, reference)
        out = kto_loss(policy.completion, reference.completion, batch.desirable, z0, beta=h.beta,
                       desirable_weight=h.desirable_weight, undesirable_weight=h.undesirable_weight)
        good, logps = batch.desirable, policy.completion.detach()
        metrics = {
            "loss": out.losses.detach(), "kl": z0.expand(len(good)),
            "rewards/chosen": out.rewards[good], "rewards/rejected": out.rewards[~good],
            "logps/chosen": logps[good], "logps/rejected": logps[~good],
        }
        return out, metrics

    def training_step(self, batch: FeedbackBatch, batch_idx: int) -> Tensor:
        out, metrics = self.example_losses(batch, "train")
        loss = out.losses.sum() / batch.example_normalizer * self.loss_scale()  # per example of the whole step
        for name, values in metrics.items():
            if len(values):  # a micro-batch may hold no example of one kind
                self.log(f"train/{name}", values.mean(), prog_bar=name == "loss")
        if len(metrics["rewards/chosen"]) and len(metrics["rewards/rejected"]):
            self.log("train/rewards/margins", metrics["rewards/chosen"].mean() - metrics["rewards/rejected"].mean())
        self.log_learning_rate()
        return loss

    def validation_step(self, batch: FeedbackBatch, batch_idx: int) -> None:
        _, metrics = self.example_losses(batch, "val")
        for name, values in metrics.items():
            if len(values):
                # Updated with the per-example values: the epoch value is the mean over every validation example.
                self.val_metrics[metric_key(name)].update(values)

    def on_validation_epoch_end(self) -> None:
        means = {name: self.val_metrics[metric_key(name)] for name in KTO_METRICS}
        values = {name: metric.compute() for name, metric in means.items() if metric.update_called}
        if "rewards/chosen" in values and "rewards/rejected" in values:
            values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name == "rewards/margins")
        for metric in means.values():
            metric.reset()
