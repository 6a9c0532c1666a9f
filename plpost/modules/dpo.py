"""DPOModule: direct preference optimisation (and cDPO, robust DPO, SLiC, IPO, SimPO, ORPO, RPO)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from plpost.data.preference import PreferenceDataModule
from plpost.data.shared_prompt import SharedPromptRows, check_shared_prompt_attention, share_prompts
from plpost.frozen import ReferenceKind
from plpost.losses import REFERENCE_FREE_LOSS_TYPES, DPOLoss, chosen_nll, dpo_loss
from plpost.modules.preference_base import PreferenceModule
from plpost.modules.preference_logps import ChosenRejected, completion_lengths, pair_logps, shared_pair_logps

if TYPE_CHECKING:
    from plpost.data.preference import PreferenceBatch

DPOLossType = Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"]  # == plpost.losses.DPO_LOSS_TYPES
NLLNormalization = Literal["pair", "token"]
PAIR_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)
"""Logged as train/<name> and val/<name>, the names TRL's DPOTrainer uses (plus nll_loss with RPO and ORPO)."""


def metric_key(name: str) -> str:
    return name.replace("/", "_")  # a module name cannot hold "/"


class DPOModule(PreferenceModule):
    """Preference optimisation of a policy on `PreferenceBatch`es against a frozen reference.

    The loss of an optimizer step is the sum of per-pair losses divided by the pairs of that
    whole step (all micro-batches, all devices), plus, with an NLL term (RPO, ORPO), its
    weight times the chosen answers' NLL normalised as `nll_normalization` says; so it is the
    same whatever the micro-batch size, gradient accumulation or device count.

    With `model_settings`, a "copy" reference loads with the policy's dtype and attention, and
    compiles with it. Besides its own arguments, DPO takes those of `PreferenceModule` and its
    bases (`ReferenceModule`: every reference, "none" only for the reference-free loss_types, and
    `PostTrainingModule`).

    Args:
        model: Hub name, local folder, or bundled name (``plpost:tiny``) of the causal LM to
            train; usually the SFT model (e.g. ``outputs/tiny-sft/model``).
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        loss_type: "sigmoid" (DPO), "robust", "hinge" (SLiC), "ipo", or the reference-free
            "simpo" and "orpo" (the odds-ratio term, plus the chosen answer's NLL with weight 1:
            ORPO needs no SFT stage before it); see `plpost.losses.dpo_loss` for each formula and
            how it maps to TRL 1.16. For "orpo", `beta` is the paper's lambda (TRL's ORPO beta).
        label_smoothing: assumed fraction of flipped preference labels (cDPO / robust DPO), in
            [0, 0.5]. TRL 1.16's "sigmoid" ignores it, so it matches TRL only at 0.
        simpo_gamma: SimPO's target reward margin gamma (TRL's `simpo_gamma`; the SimPO paper's
            gamma_beta_ratio times beta).
        rpo_alpha: add alpha times the NLL of the chosen completions (RPO, Pang et al. 2024);
            None adds nothing. With nll_normalization "token" this is TRL 1.16's
            loss_type=["sigmoid", "sft"], loss_weights=[1, alpha].
        nll_normalization: how the NLL term of RPO and ORPO averages the chosen tokens. "pair":
            each pair's NLL divided by its own chosen length, then averaged over the pairs of the
            step like the preference loss: every pair counts the same, whatever its length, as
            in RPO's paper (which counts the prompt tokens in the length too). "token": the NLL summed over every chosen token of the step
            (all micro-batches and devices) divided by their count, the SFT loss (TRL's "sft"
            term and ORPO's nll_loss average over the chosen tokens of their batch; on one
            micro-batch on one device they are the same, and TRL's ORPO counts the prompt
            tokens too). Default: "pair" for RPO, "token" for ORPO, whose NLL term is the SFT
            loss it replaces.
        share_prompt: compute each pair's prompt once, in one row of prompt + chosen + rejected
            with a mask that keeps the rejected tokens from seeing the chosen ones (see
            `plpost.data.shared_prompt`), for the policy and the reference alike: the same
            log-probs and gradients, fewer tokens. Needs attn_implementation "sdpa" or "eager";
            off, chosen and rejected are two padded rows.
    """

    data_modules = (PreferenceDataModule,)
    logps_type = ChosenRejected
    reference_kinds = ("auto", "copy", "adapter", "precomputed", "none")

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float | None = None,
        nll_normalization: NLLNormalization | None = None,
        share_prompt: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        self.check_settings()
        self.nll_weight = 1.0 if loss_type == "orpo" else rpo_alpha
        self.nll_normalization = nll_normalization or ("token" if loss_type == "orpo" else "pair")
        names = PAIR_METRICS + (("nll_loss",) if self.nll_weight is not None else ())
        self.val_metrics = nn.ModuleDict({metric_key(name): MeanMetric() for name in names})

    def choose_reference(self, kind: ReferenceKind, reference_model: str | None, *, allowed: tuple[str, ...]) -> None:
        # A reference-free loss compares against nothing: "auto" is no reference for it.
        if kind == "auto" and self.hparams.loss_type in REFERENCE_FREE_LOSS_TYPES:
            kind = "none"
        super().choose_reference(kind, reference_model, allowed=allowed)

    def check_settings(self) -> None:
        """Fails on contradictory settings now, not after the model has loaded."""
        h = self.hparams
        free = " and ".join(f"{kind!r}" for kind in REFERENCE_FREE_LOSS_TYPES)
        if h.loss_type in REFERENCE_FREE_LOSS_TYPES and self.reference_kind != "none":
            raise ValueError(f"loss_type={h.loss_type!r} is reference-free: set reference='none' (a reference would be "
                             "computed and never used)")
        if self.reference_kind == "none" and h.loss_type not in REFERENCE_FREE_LOSS_TYPES:
            raise ValueError(f"loss_type={h.loss_type!r} compares against a reference; reference='none' is only "
                             f"for the loss_types {free}")
        if h.rpo_alpha is not None and h.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {h.rpo_alpha}")
        if h.rpo_alpha is not None and h.loss_type == "orpo":
            raise ValueError("loss_type='orpo' holds the chosen NLL already (weight 1); rpo_alpha would add it twice")
        if h.nll_normalization is not None and h.rpo_alpha is None and h.loss_type != "orpo":
            raise ValueError("nll_normalization says how the NLL term of RPO or ORPO is averaged, but there is none: "
                             "set rpo_alpha or loss_type='orpo'")
        one = torch.zeros(1)  # dpo_loss validates beta, loss_type and label_smoothing
        dpo_loss(one, one, one, one, beta=h.beta, loss_type=h.loss_type, label_smoothing=h.label_smoothing,
                 chosen_lengths=one + 1, rejected_lengths=one + 1, simpo_gamma=h.simpo_gamma)

    def check_policy(self) -> None:
        if self.hparams.share_prompt:
            check_shared_prompt_attention(self.policy.config._attn_implementation)

    def model_logps(
        self, model: nn.Module, batch: PreferenceBatch, rows: SharedPromptRows | None = None
    ) -> ChosenRejected:
        """`model`'s log-probs of each pair's completions, in the layout `share_prompt` picks.

        rows: the batch's shared-prompt layout, when the caller built it already (the steps build
        it once for the policy and the reference); ignored when share_prompt is off.
        """
        if not self.hparams.share_prompt:
            return pair_logps(model, batch)
        if rows is None:
            rows = share_prompts(batch, self.tokenizer.pad_token_id)
        mask = rows.attention_mask(self.policy.config._attn_implementation, self.policy.dtype)
        return shared_pair_logps(model, rows, mask)

    def policy_and_reference_logps(
        self, batch: PreferenceBatch, split: str
    ) -> tuple[ChosenRejected, ChosenRejected | None]:
        """The policy's log-probs (one forward over the pairs) and the reference's, from one layout."""
        rows = share_prompts(batch, self.tokenizer.pad_token_id) if self.hparams.share_prompt else None
        return self.model_logps(self.policy, batch, rows), self.reference_logps(batch, split, rows)

    def example_index(self, batch: PreferenceBatch) -> Tensor:
        return batch.pair_index

    # -- steps ----------------------------------------------------------------------------
    def pair_losses(
        self, policy: ChosenRejected, reference: ChosenRejected | None, batch: PreferenceBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses (N,) and per-pair metrics: the preference loss, plus the NLL term's weight
        times each pair's share of the chosen NLL. With nll_normalization "token" that share is
        its summed NLL times N_step / T_step (pairs and chosen tokens of the step), so that the
        sum over the step's pairs divided by N_step is the NLL per chosen token of the step. The
        logged nll_loss is each pair's NLL per token of its chosen answer, in both modes."""
        h = self.hparams
        lengths = completion_lengths(batch)
        out: DPOLoss = dpo_loss(
            policy.chosen, policy.rejected, *(reference or (None, None)), beta=h.beta, loss_type=h.loss_type,
            label_smoothing=h.label_smoothing, chosen_lengths=lengths.chosen, rejected_lengths=lengths.rejected,
            simpo_gamma=h.simpo_gamma,
        )
        losses = out.losses
        metrics = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
        }
        if self.nll_weight is not None:
            nll = chosen_nll(policy.chosen, lengths.chosen)
            if self.nll_normalization == "token":
                share = -policy.chosen * (batch.pair_normalizer / batch.chosen_token_normalizer)
            else:
                share = nll
            losses = losses + self.nll_weight * share
            metrics["nll_loss"] = nll.detach()
        metrics["loss"] = losses.detach()
        return losses, metrics

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        policy, reference = self.policy_and_reference_logps(batch, "train")
        losses, metrics = self.pair_losses(policy, reference, batch)
        loss = losses.sum() / batch.pair_normalizer * self.loss_scale()  # per pair of the whole optimizer step
        for name, values in metrics.items():
            self.log(f"train/{name}", values.mean(), prog_bar=name in ("loss", "rewards/accuracies"))
        self.log_learning_rate()
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        policy, reference = self.policy_and_reference_logps(batch, "val")
        _, metrics = self.pair_losses(policy, reference, batch)
        for name, values in metrics.items():
            # Updated with the per-pair values: the epoch value is the mean over every validation pair.
            self.val_metrics[metric_key(name)].update(values)
            self.log(f"val/{name}", self.val_metrics[metric_key(name)], prog_bar=name == "rewards/accuracies")
