"""DPOModule: direct preference optimisation (and cDPO, robust DPO, SLiC, IPO, SimPO, RPO)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from plpost.data.preference import PreferenceDataModule
from plpost.data.shared_prompt import SharedPromptRows, check_shared_prompt_attention, share_prompts
from plpost.losses import DPOLoss, chosen_nll, dpo_loss
from plpost.modules.base import LoraSettings, PostTrainingModule, default_optimizer, disable_dropout
from plpost.modules.preference_logps import ChosenRejected, completion_lengths, pair_logps, shared_pair_logps
from plpost.modules.reference import (
    FrozenCopy,
    adapter_disabled,
    cache_key,
    lookup,
    model_fingerprint,
    precompute_logps,
)

if TYPE_CHECKING:
    from plpost.data.preference import PreferenceBatch

DPOLossType = Literal["sigmoid", "robust", "hinge", "ipo", "simpo"]  # == plpost.losses.DPO_LOSS_TYPES
ReferenceKind = Literal["copy", "adapter", "precomputed", "none"]
PAIR_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)
"""Logged as train/<name> and val/<name>, the names TRL's DPOTrainer uses (plus nll_loss with RPO)."""


def metric_key(name: str) -> str:
    return name.replace("/", "_")  # a module name cannot hold "/"


class DPOModule(PostTrainingModule):
    """Preference optimisation of a policy on `PreferenceBatch`es against a frozen reference.

    The loss of an optimizer step is the sum of per-pair losses divided by the pairs of that
    whole step (all micro-batches, all devices), so it is the same whatever the micro-batch
    size, gradient accumulation or device count.

    Args:
        model: Hub name, local folder, or bundled name (``plpost:tiny``) of the causal LM to
            train; usually the SFT model (e.g. ``outputs/tiny-sft/model``).
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        beta: the inverse temperature of the implicit reward beta * log(pi / pi_ref); larger
            keeps the policy closer to the reference.
        loss_type: "sigmoid" (DPO), "robust", "hinge" (SLiC), "ipo", or "simpo" (reference-free);
            see `plpost.losses.dpo_loss` for each formula.
        label_smoothing: assumed fraction of flipped preference labels (cDPO / robust DPO), in [0, 0.5].
        simpo_gamma: SimPO's target reward margin gamma (TRL's `simpo_gamma`; the SimPO paper's
            gamma_beta_ratio times beta).
        rpo_alpha: add alpha times the per-token NLL of the chosen completion to each pair's
            loss (RPO, Pang et al. 2024); None adds nothing.
        reference: where the reference log-probs come from. "copy": a frozen second model in
            memory. "adapter": the policy with its LoRA adapter disabled (needs `lora`; no second
            copy, one more forward). "precomputed": computed for every training and validation
            pair once before training (reference loaded only for that pass), cached on disk.
            "none": no reference, only for loss_type "simpo".
        reference_model: the reference's Hub name or folder (default: `model`, the policy's
            starting weights). Not with "adapter", whose reference is always `model`.
        reference_cache_dir: where "precomputed" keeps its log-probs, one file per reference,
            tokenizer and data; a rerun with the same ones reads them instead of recomputing.
        share_prompt: compute each pair's prompt once, in one row of prompt + chosen + rejected
            with a mask that keeps the rejected tokens from seeing the chosen ones (see
            `plpost.data.shared_prompt`), for the policy and the reference alike: the same
            log-probs and gradients, fewer tokens. Needs attn_implementation "sdpa" or "eager";
            off, chosen and rejected are two padded rows.
        disable_dropout: turn off every dropout in the policy, so its log-probs are as
            deterministic as the reference's (as TRL's DPO does by default).
        random_init: build the model from its config with random weights instead of loading them.
        dtype: load the weights in this dtype (default: as stored). For mixed precision use the
            Trainer's `precision` instead.
        attn_implementation: "sdpa", "eager", "flash_attention_2", ... (default: transformers' choice).
        trust_remote_code: allow model code from the model's repository (off: it runs arbitrary code).
        lora: train LoRA adapters instead of all weights.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        torch_compile: compile the forwards of the policy and of a "copy" reference with
            `torch.compile`, for faster steps. The first step pays for the compile (about 30 s
            for the tiny model on a CPU, more for larger ones, and again at the first validation
            step); shapes are compiled dynamic, so batches of other lengths do not recompile.
            Checkpoints and exports are unchanged.
        optimizer: the optimizer, given the trainable parameters.
        scheduler: the learning-rate schedule, stepped every optimizer step.
    """

    frozen_modules = ("reference",)
    data_modules = (PreferenceDataModule,)

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float | None = None,
        reference: ReferenceKind = "copy",
        reference_model: str | None = None,
        reference_cache_dir: str = ".plpost-cache/reference",
        share_prompt: bool = True,
        disable_dropout: bool = True,
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
            model, tokenizer, random_init=random_init, dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, lora=lora, gradient_checkpointing=gradient_checkpointing,
            torch_compile=torch_compile, optimizer=optimizer, scheduler=scheduler,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.check_settings()
        self.reference_name = reference_model or model
        self.reference: FrozenCopy | None = None  # built in configure_model for reference="copy"
        # split -> (the examples it holds, pair_index -> (chosen, rejected) reference log-probs)
        self.precomputed: dict[str, tuple[list[dict], Tensor]] = {}
        self.reference_cache_files: dict[str, str] = {}
        names = PAIR_METRICS + (("nll_loss",) if rpo_alpha is not None else ())
        self.val_metrics = nn.ModuleDict({metric_key(name): MeanMetric() for name in names})

    def check_settings(self) -> None:
        """Fails on contradictory settings now, not after the model has loaded."""
        h = self.hparams
        if h.reference == "adapter" and h.lora is None:
            raise ValueError("reference='adapter' is the policy with its LoRA adapter disabled, so it needs `lora`; "
                             "without LoRA use reference='copy' or 'precomputed'")
        if h.reference == "adapter" and h.reference_model not in (None, h.model):
            raise ValueError("reference='adapter' always compares against `model` (the adapter's base); "
                             "for another reference_model use reference='copy' or 'precomputed'")
        if h.loss_type == "simpo" and h.reference != "none":
            raise ValueError("loss_type='simpo' is reference-free: set reference='none' (a reference would be "
                             "computed and never used)")
        if h.reference == "none" and h.loss_type != "simpo":
            raise ValueError(f"loss_type={h.loss_type!r} compares against a reference; reference='none' is only "
                             "for loss_type='simpo'")
        if h.reference == "precomputed" and h.random_init and h.reference_model is None:
            raise ValueError("random_init gives starting weights that cannot be reloaded for reference='precomputed'; "
                             "use reference='copy' or give reference_model")
        if h.rpo_alpha is not None and h.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {h.rpo_alpha}")
        one = torch.zeros(1)  # dpo_loss validates beta, loss_type and label_smoothing
        dpo_loss(one, one, one, one, beta=h.beta, loss_type=h.loss_type, label_smoothing=h.label_smoothing,
                 chosen_lengths=one + 1, rejected_lengths=one + 1, simpo_gamma=h.simpo_gamma)

    # -- models ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        start = self.load_pretrained()
        if self.hparams.reference == "copy":
            # The policy's own starting weights need no second load (and random_init needs the copy).
            weights = copy.deepcopy(start) if self.hparams.reference_model is None else self.load_reference()
            self.reference = FrozenCopy(weights, source=self.frozen_sources()["reference"])
        self.policy = self.prepare_trainable(start)
        if self.hparams.disable_dropout:
            disable_dropout(self.policy)
        if self.hparams.share_prompt:
            check_shared_prompt_attention(self.policy.config._attn_implementation)
        self.finish_models()

    def sharded_modules(self) -> list[torch.nn.Module | None]:
        return [self.policy, self.reference.model if self.reference is not None else None]

    def compiled_modules(self) -> list[nn.Module | None]:
        # The frozen copy runs over the same rows as the policy at every step, a forward as long as
        # the policy's own, and costs one more compile without a backward (measured on the tiny
        # model: no longer first step). "adapter" is the policy itself, compiled already (with the
        # adapter off it compiles once more); "precomputed" runs its reference once, before
        # training, where the compile would cost about what it saves.
        return [self.policy, self.reference.model if self.reference is not None else None]

    def load_reference(self) -> nn.Module:
        return self.load_pretrained(self.reference_name, random_init=False)

    def frozen_sources(self) -> dict[str, str]:
        kind = self.hparams.reference
        if kind == "adapter":
            return {"reference": f"{self.model_name} (the policy with its LoRA adapter disabled)"}
        if kind == "none":
            return {}
        source = self.reference_name
        if self.hparams.random_init and self.hparams.reference_model is None:
            source += " (random_init: the starting weights are not reproducible from this name)"
        sources = {"reference": source}
        sources.update({f"reference_logps/{split}": path for split, path in self.reference_cache_files.items()})
        return sources

    def pair_logps(
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
        return self.pair_logps(self.policy, batch, rows), self.reference_logps(batch, split, rows)

    # -- reference log-probs --------------------------------------------------------------
    def reference_logps(
        self, batch: PreferenceBatch, split: str, rows: SharedPromptRows | None = None
    ) -> ChosenRejected | None:
        """From the frozen copy, the policy with its adapter disabled, the precomputed table, or None."""
        kind = self.hparams.reference
        if kind == "copy":
            with torch.no_grad():
                return self.pair_logps(self.reference, batch, rows)
        if kind == "adapter":
            with adapter_disabled(self.policy) as base:
                return self.pair_logps(base, batch, rows)
        if kind == "precomputed":
            _, table = self.precomputed[split]
            return ChosenRejected(*lookup(table, batch.pair_index).unbind(-1))
        return None

    def on_fit_start(self) -> None:
        self.precompute_reference(("train", "val"))

    def on_validation_start(self) -> None:
        self.precompute_reference(("val",))  # for `validate` without `fit`

    def precompute_reference(self, splits: tuple[str, ...]) -> None:
        """Fills `self.precomputed` for the splits the data module has, from cache or one forward pass."""
        if self.hparams.reference != "precomputed":
            return
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "train_examples"):
            raise ValueError("reference='precomputed' needs a plpost data module (PreferenceDataModule): it "
                             "precomputes the reference log-probs of its train_examples and val_examples")
        examples = {split: getattr(data, f"{split}_examples") for split in splits}
        # Identity, not equality: a new data module (another `fit` or `validate`) is looked at again.
        examples = {s: rows for s, rows in examples.items() if rows and self.precomputed.get(s, (None,))[0] is not rows}
        if not examples:
            return
        reference = model_fingerprint(self.reference_name)
        jobs = {}
        for split, rows in examples.items():
            key = cache_key(reference, rows, tokenizer=self.tokenizer_name, dtype=self.dtype_name,
                            attn_implementation=self.attn_implementation, precision=self.trainer.precision)
            jobs[split] = (Path(self.hparams.reference_cache_dir) / f"{key}.pt", rows)
            self.reference_cache_files[split] = str(jobs[split][0])
        tables = precompute_logps(
            jobs, self.load_frozen_reference, self.indexed_pair_logps, collate=data.collate_fn(), columns=2,
            batch_size=data.eval_batch_size, trainer=self.trainer,
        )
        self.precomputed.update({split: (examples[split], table.to(self.device)) for split, table in tables.items()})

    def load_frozen_reference(self) -> nn.Module:
        """The reference on this device, converted as the strategy converted the policy (e.g. bf16-true)."""
        model = self.trainer.precision_plugin.convert_module(self.load_reference())
        return FrozenCopy(model, source=self.reference_name).to(self.device)

    def indexed_pair_logps(self, model: nn.Module, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        with self.trainer.precision_plugin.val_step_context():  # the autocast the live reference runs in
            logps = self.pair_logps(model, batch)
        return batch.pair_index, torch.stack(logps, dim=-1)

    # -- steps ----------------------------------------------------------------------------
    def pair_losses(
        self, policy: ChosenRejected, reference: ChosenRejected | None, batch: PreferenceBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses (N,): the preference loss, plus rpo_alpha * chosen NLL; and per-pair metrics."""
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
        if h.rpo_alpha is not None:
            nll = chosen_nll(policy.chosen, lengths.chosen)
            losses = losses + h.rpo_alpha * nll
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
