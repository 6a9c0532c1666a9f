"""SFTModule: supervised fine-tuning with the loss on assistant tokens only."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from plpost.data.chat import ChatDataModule
from plpost.data.collate import ChatBatch
from plpost.losses import SFTTokenLosses, next_token_targets, sft_token_losses
from plpost.modules.base import PostTrainingModule


class SFTModule(PostTrainingModule):
    """Token-level cross-entropy on the supervised (assistant) tokens of `ChatBatch`es.

    The loss of an optimizer step is the sum of token losses divided by the supervised tokens
    of that whole step (all micro-batches, all devices), so it is the same whatever the
    micro-batch size, gradient accumulation or device count.

    Takes the arguments of `PostTrainingModule`, and no others.
    """

    data_modules = (ChatDataModule,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64))

    def token_losses(self, batch: ChatBatch) -> SFTTokenLosses:
        # use_cache=False: with a cache, transformers ignores packed position ids and lets
        # attention cross from one packed sequence into the next.
        logits = self.policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        return sft_token_losses(logits, next_token_targets(batch.labels))

    def training_step(self, batch: ChatBatch, batch_idx: int) -> Tensor:
        out = self.token_losses(batch)
        loss = out.losses.sum() / batch.loss_normalizer * self.loss_scale()  # per token of the optimizer step
        supervised = out.mask.sum()
        self.tokens_seen += self.global_sum(supervised).to(self.tokens_seen.dtype)
        self.log("train/loss", out.losses.sum() / supervised.clamp(min=1), prog_bar=True)
        self.log("train/token_accuracy", out.correct.sum() / supervised.clamp(min=1))
        self.log("train/tokens_seen", self.tokens_seen.float(), rank_zero_only=True)
        self.log_learning_rate()
        return loss

    def validation_step(self, batch: ChatBatch, batch_idx: int) -> None:
        out = self.token_losses(batch)
        supervised = out.mask.sum()
        # Weighted by tokens, so the epoch value is the per-token mean over the whole validation set.
        self.val_loss.update(out.losses.sum() / supervised, weight=supervised)
        self.val_accuracy.update(out.correct.sum() / supervised, weight=supervised)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/token_accuracy", self.val_accuracy)
