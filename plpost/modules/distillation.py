"""DistillationModule: on-policy distillation (GKD): the student samples its own completions and
learns the teacher's next-token distribution on them."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from plpost.data.prompts import PromptBatch
from plpost.frozen import FrozenCopy
from plpost.hf import check_same_tokenizer, check_vocabulary_fits
from plpost.losses import masked_sum, token_divergence
from plpost.losses.distillation import Divergence
from plpost.modules.online import OnlineModule
from plpost.rollout import Samples, join_responses, response_logits


class DistillationModule(OnlineModule):
    """Generalised knowledge distillation (Agarwal et al. 2024), one optimizer step per generation batch.

    A training step takes a `PromptBatch`; with probability `lmbda` (drawn once per generation
    batch, the same on every device, as TRL's GKD draws it) the student samples a completion of
    each prompt, otherwise the batch's dataset completions are used (`PromptDataModule(...,
    completions=True)`). Student and frozen teacher then run one forward each over prompt +
    completion, and the loss is the divergence of the student's next-token distribution from the
    teacher's at every completion token (`plpost.losses.token_divergence`), summed and divided by
    the completion tokens of the whole generation batch on all devices: the same loss and
    gradients whatever the micro-batch (`gradient_accumulation_steps`) or device split.
    Optimization is manual: `trainer.global_step` counts generation batches.

    The divergence is taken over the tokenizer's `len(tokenizer)` tokens: the embedding rows past
    it, which models of one family pad to different multiples (Qwen2.5-7B has 152064 rows,
    0.5B 151936), are no token either model can be given, so a teacher and a student of the same
    tokenizer compare whatever their embedding widths.

    Both distributions are taken at the sampling `temperature`, as TRL does. The logits of both
    models over a micro-batch are in memory at once, so `gradient_accumulation_steps` bounds that
    memory. With `model_settings`, the teacher, never trained, loads in the compute dtype (see
    `plpost.precision`) and compiles with the student. Besides its own arguments, distillation
    takes those of `OnlineModule` and `PostTrainingModule`.

    Args:
        model: the student's initial weights: Hub name, folder or ``plpost:tiny``.
        teacher: the frozen teacher: Hub name or folder, with the student's tokenizer (a teacher
            whose vocabulary differs is refused before its weights load), loaded as stored (see
            `plpost.frozen`).
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        divergence: "forward_kl" KL(teacher || student) (TRL's beta = 0), "reverse_kl"
            KL(student || teacher) (TRL's beta = 1, its DistillationTrainer's default), or "jsd" the
            generalised Jensen-Shannon divergence with `beta`.
        beta: the JSD's weight of the teacher in its mixture, 0 < beta < 1 (read by "jsd" only).
        lmbda: the share of generation batches the student samples (1: on-policy only, TRL's
            DistillationTrainer; 0: supervised KD on the dataset's completions only; dataset
            completions are kept whole, not cut at max_new_tokens).
    """

    def __init__(
        self,
        model: str,
        teacher: str,
        tokenizer: str | None = None,
        *,
        divergence: Divergence = "reverse_kl",
        beta: float = 0.5,
        lmbda: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        # Refuses an unknown divergence or a JSD beta outside (0, 1) now, not at the first step.
        token_divergence(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1), divergence=divergence,
                         beta=beta)
        if not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda is the share of generation batches the student samples, in [0, 1]; got {lmbda}")
        self.teacher_name = teacher
        self.teacher: FrozenCopy | None = None

    @property
    def optimizer_steps_per_batch(self) -> int:
        return 1

    # -- models ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.trainer.datamodule
        if self.hparams.lmbda < 1 and data is not None and not getattr(data, "completions", False):
            raise ValueError(f"lmbda={self.hparams.lmbda} trains on dataset completions in "
                             f"{1 - self.hparams.lmbda:.0%} of the generation batches: give the data "
                             "completions: true and a 'completion' column, or set lmbda: 1 (on-policy only)")

    def build_models(self) -> None:
        # Before any weights load: a teacher of another vocabulary cannot be compared token by token.
        check_same_tokenizer(self.tokenizer, self.tokenizer_name, self.teacher_name,
                             trust_remote_code=self.model_settings.trust_remote_code)
        super().build_models()

    def build_frozen_models(self, start: torch.nn.Module) -> None:
        self.teacher = self.frozen_model(self.teacher_name, start)
        check_vocabulary_fits(self.tokenizer, self.tokenizer_name, self.teacher.model, self.teacher_name)

    # -- completions ----------------------------------------------------------------------
    def completions(self, batch: PromptBatch) -> tuple[Samples, bool]:
        """The generation batch's completions, and whether the student sampled them."""
        lmbda = self.hparams.lmbda
        draw = lmbda == 1 or (lmbda > 0 and torch.rand(()).item() < lmbda)
        on_policy = bool(self.trainer.strategy.broadcast(draw))  # every device samples, or none does
        if on_policy:
            return self.sample(batch.input_ids, batch.attention_mask), True
        mask = batch.completion_mask.bool()
        # A dataset completion ends with its stop token (see PromptDataModule's `completions`).
        stopped = torch.ones(len(mask), dtype=torch.bool, device=mask.device)
        return join_responses(batch.input_ids, batch.attention_mask, batch.completion_ids, mask, stopped), False

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        started = time.perf_counter()
        samples, on_policy = self.completions(batch)
        generated = time.perf_counter()
        mask = samples.response_mask
        tokens = self.global_sum(mask.sum())  # the completion tokens of the generation batch on every device

        def micro_batch_loss(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            divergence = self.micro_batch_divergence(samples, rows)
            return divergence, {"divergence": divergence.detach()}

        sums = self.update(len(mask), micro_batch_loss, lambda rows: tokens)
        lengths = mask.sum(1).float()
        metrics = {
            "train/loss": self.global_sum(sums["divergence"]) / tokens.clamp(min=1.0),
            "completions/mean_length": lengths.mean(), "completions/clipped_ratio": (~samples.stopped).float().mean(),
            "on_policy": float(on_policy),
        }
        self.log_generation_batch(metrics, shown="train/loss", episodes=self.count_episodes(len(mask)),
                                  generation_s=generated - started, update_s=time.perf_counter() - generated)

    def micro_batch_divergence(self, samples: Samples, rows: Tensor) -> Tensor:
        """The summed divergence over the completion tokens of `rows` (differentiable in the student)."""
        hp = self.hparams
        tensors = [t[rows] for t in (samples.input_ids, samples.attention_mask, samples.position_ids,
                                     samples.response_mask)]
        vocabulary = len(self.tokenizer)
        with torch.no_grad():
            teacher_logits = response_logits(self.teacher, *tensors)[..., :vocabulary]
        student_logits = response_logits(self.policy, *tensors)[..., :vocabulary]
        mask = tensors[-1]
        divergences = token_divergence(student_logits, teacher_logits, mask, divergence=hp.divergence, beta=hp.beta,
                                       temperature=hp.temperature)
        return masked_sum(divergences, mask)
