"""SFTModule: supervised fine-tuning with the loss on assistant tokens only."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from plpost.data.chat import ChatDataModule
from plpost.data.collate import ChatBatch
from plpost.losses import SFTTokenLosses, next_token_targets, sft_token_losses
from plpost.modules.base import LoraSettings, PostTrainingModule, default_optimizer


class SFTModule(PostTrainingModule):
    """Token-level cross-entropy on the supervised (assistant) tokens of `ChatBatch`es.

    The loss of an optimizer step is the sum of token losses divided by the supervised tokens
    of that whole step (all micro-batches, all devices), so it is the same whatever the
    micro-batch size, gradient accumulation or device count.

    Args:
        model: Hub name, local folder, or bundled name (``plpost:tiny``) of a causal LM.
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        random_init: build the model from its config with random weights instead of loading them.
        dtype: the weights' dtype outside a Trainer (exporting, chatting). Training, the Trainer's
            `precision` decides (float32 trained weights under `*-mixed`, see `plpost.precision`),
            and a `dtype` that contradicts it is refused.
        attn_implementation: "sdpa", "eager", "flash_attention_2", ... (default: transformers' choice).
        trust_remote_code: allow model code from the model's repository (off: it runs arbitrary code).
        lora: train LoRA adapters instead of all weights.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        torch_compile: compile the model's forward with `torch.compile`, for faster steps. The
            first step pays for the compile (about 30 s for the tiny model on a CPU, more for
            larger ones, and again at the first validation step); shapes are compiled dynamic,
            so batches of other lengths do not recompile. Checkpoints and exports are unchanged.
        optimizer: the optimizer, given the trainable parameters.
        scheduler: the learning-rate schedule, stepped every optimizer step.
    """

    data_modules = (ChatDataModule,)

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        random_init: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        torch_compile: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            random_init=random_init,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            torch_compile=torch_compile,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
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
