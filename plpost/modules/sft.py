"""SFTModule: supervised fine-tuning with the loss on assistant tokens only."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from plpost.data.chat import ChatDataModule
from plpost.data.collate import ChatBatch
from plpost.losses import SFTTokenLosses, next_token_targets, sft_token_losses
from plpost.modules.base import PostTrainingModule, default_optimizer
from plpost.modules.settings import ModelSettings


class SFTModule(PostTrainingModule):
    """Token-level cross-entropy on the supervised (assistant) tokens of `ChatBatch`es.

    The loss of an optimizer step is the sum of token losses divided by the supervised tokens
    of that whole step (all micro-batches, all devices), so it is the same whatever the
    micro-batch size, gradient accumulation or device count.

    Args:
        model: Hub name, local folder, or bundled name (``plpost:tiny``) of a causal LM.
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        model_settings: how the model loads and trains (`plpost.modules.ModelSettings`: random_init,
            dtype, attention, LoRA, gradient checkpointing, torch_compile).
        optimizer: the optimizer, given the trainable parameters.
        scheduler: the learning-rate schedule, stepped every optimizer step.
    """

    data_modules = (ChatDataModule,)

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        model_settings: ModelSettings = ModelSettings(),
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(model, tokenizer, model_settings=model_settings, optimizer=optimizer, scheduler=scheduler)
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
