"""RewardModule: a scalar reward head on the transformer, trained with a Bradley-Terry loss on pairs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from plpost.data.preference import PreferenceBatch, PreferenceDataModule
from plpost.data.shared_prompt import SharedPromptRows, check_shared_prompt_attention, share_prompts
from plpost.hf import load_causal_lm
from plpost.losses import RewardLoss, bradley_terry_loss, reward_centering_penalty
from plpost.modules.base import PostTrainingModule
from plpost.modules.settings import ModelSettings
from plpost.reward_head import SCORE_HEAD, backbone_and_head, sequence_rewards

PAIR_METRICS = ("loss", "accuracy", "rewards_chosen", "rewards_rejected", "margin")


def shared_prompt_rewards(model: nn.Module, rows: SharedPromptRows) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards, (N,) each, from one forward over N prompt + chosen + rejected rows
    (see `plpost.data.shared_prompt`): the score head at the last token of each completion."""
    classifier, head = backbone_and_head(model)
    mask = rows.attention_mask(classifier.config._attn_implementation, classifier.dtype)
    hidden = classifier.base_model(
        input_ids=rows.input_ids, attention_mask=mask, position_ids=rows.position_ids, use_cache=False
    ).last_hidden_state
    pairs = torch.arange(hidden.shape[0], device=hidden.device)
    ends = torch.cat([rows.chosen_end, rows.rejected_end])
    return head(hidden[pairs.repeat(2), ends]).squeeze(-1).chunk(2)


class PairOutputs(NamedTuple):
    """Rewards and losses of N pairs, all (N,)."""

    chosen_rewards: Tensor
    rejected_rewards: Tensor
    fit: RewardLoss
    losses: Tensor
    """Bradley-Terry plus the weighted centering penalty: what is minimised, per pair."""


class RewardModule(PostTrainingModule):
    """Trains a scalar reward r(prompt, completion) so that chosen completions outscore rejected ones.

    The model is the transformer with a one-output linear head (`AutoModelForSequenceClassification`,
    num_labels=1), read at the last real token of each sequence (see `sequence_rewards`); it is
    `self.policy`, the base class's name for the model being trained. Per pair, the loss is
    -log sigmoid(r_chosen - r_rejected - margin) (+ center_rewards_coefficient *
    (r_chosen + r_rejected)^2); the loss of an optimizer step is the sum over its pairs divided
    by the pairs of that whole step (all micro-batches, all devices), so it is the same whatever
    the micro-batch size, gradient accumulation or device count. The exported folder loads with
    `AutoModelForSequenceClassification.from_pretrained` (its config carries the pad token id).

    With LoRA (`model_settings`), the reward head is always trained in full (it is added to
    `modules_to_save`), since it starts from random weights; `torch_compile` compiles the backbone
    (which the rewards call). Besides its own arguments, it takes those of `PostTrainingModule`.

    Args:
        model: Hub name, local folder, or bundled name (``plpost:tiny``) of a causal LM (usually
            the SFT model); its backbone is loaded and a new reward head put on top.
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        center_rewards_coefficient: weight of the reward-centering penalty (Eisenstein et al.,
            2023; e.g. 0.01), which keeps rewards near 0 on average; None: no penalty.
        share_prompt: compute each pair's prompt once, in one row of prompt + chosen + rejected
            with a mask that keeps the rejected tokens from seeing the chosen ones (see
            `plpost.data.shared_prompt`): the same rewards and gradients, fewer tokens. Needs
            attn_implementation "sdpa" or "eager"; off, chosen and rejected are two padded rows.
    """

    data_modules = (PreferenceDataModule,)
    task_type = "SEQ_CLS"

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        center_rewards_coefficient: float | None = None,
        share_prompt: bool = True,
        **kwargs: Any,
    ) -> None:
        settings: ModelSettings | None = kwargs.get("model_settings")  # only given ones: the default has no LoRA
        lora = settings.lora if settings is not None else None
        if lora is not None and SCORE_HEAD not in (lora.modules_to_save or []):
            lora = replace(lora, modules_to_save=[*(lora.modules_to_save or []), SCORE_HEAD])
            kwargs["model_settings"] = replace(settings, lora=lora)
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient
        self.share_prompt = share_prompt
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in PAIR_METRICS})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in PAIR_METRICS})

    def load_pretrained(
        self, name_or_path: str | None = None, *, random_init: bool | None = None, frozen: bool = False,
        empty: bool | None = None,
    ) -> PreTrainedModel:
        # The same backbone as the causal LM, with a scalar head. The pad id goes into the config
        # so Hugging Face's own pooling (used by other libraries) works wherever pad != eos;
        # plpost itself never relies on it.
        return load_causal_lm(
            name_or_path or self.model_name, **self.loading_arguments(random_init, frozen, empty),
            auto_class=AutoModelForSequenceClassification, num_labels=1, pad_token_id=self.tokenizer.pad_token_id,
        )

    def build_models(self) -> None:
        super().build_models()
        if self.share_prompt:
            check_shared_prompt_attention(backbone_and_head(self.policy)[0].config._attn_implementation)

    def compiled_modules(self) -> list[nn.Module]:
        # Rewards call the backbone and the head themselves (see `sequence_rewards`), never the
        # model's own forward, so compiling that would change nothing; the one-row-per-pair head
        # is too small to gain from it.
        return [backbone_and_head(self.policy)[0].base_model]

    def rewards(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) rewards, (N,) each, float32, from one forward (N shared-prompt rows, or 2N)."""
        if self.share_prompt:
            chosen, rejected = shared_prompt_rewards(self.policy, share_prompts(batch, self.tokenizer.pad_token_id))
            return chosen.float(), rejected.float()
        rewards = sequence_rewards(self.policy, batch.input_ids, batch.attention_mask, batch.position_ids).float()
        return rewards.chunk(2)

    def pair_outputs(self, batch: PreferenceBatch) -> PairOutputs:
        chosen, rejected = self.rewards(batch)
        fit = bradley_terry_loss(chosen, rejected, batch.margin)
        losses = fit.losses
        if self.center_rewards_coefficient:
            losses = losses + self.center_rewards_coefficient * reward_centering_penalty(chosen, rejected)
        return PairOutputs(chosen, rejected, fit, losses)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        out = self.pair_outputs(batch)
        loss = out.losses.sum() / batch.pair_normalizer * self.loss_scale()  # per pair of the optimizer step
        self.log_pair_metrics(out, stage="train")
        self.log_learning_rate()
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self.log_pair_metrics(self.pair_outputs(batch), stage="val")

    def log_pair_metrics(self, out: PairOutputs, stage: Literal["train", "val"]) -> None:
        """Per-pair means: train logs each step's pairs, val the whole validation set's."""
        values = {
            "loss": out.losses, "accuracy": out.fit.accurate.float(), "rewards_chosen": out.chosen_rewards,
            "rewards_rejected": out.rejected_rewards, "margin": out.fit.margins,
        }
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        for name, value in values.items():
            # Calling the metric updates it and returns this batch's mean, which on_step logs;
            # per-pair updates make the epoch value a mean over pairs, however batches split.
            metrics[name](value.detach())
            self.log(
                f"{stage}/{name}", metrics[name], on_step=stage == "train", on_epoch=stage == "val",
                prog_bar=name in ("loss", "accuracy"),
            )
