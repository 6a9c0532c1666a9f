"""NonFiniteGuard: an optimizer step whose loss or gradients are not finite stops training, or is skipped."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from plpost.data.sources import describe

OnNonFinite = Literal["error", "skip"]
RECORD_FIELDS = ("record_index", "pair_index")
"""Batch fields that hold each example's record index in its source (ChatBatch, PreferenceBatch)."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite; the message names the step and the records of its batches."""


class NonFiniteGuard(L.Callback):
    """Checks every optimizer step before the optimizer sees it: the loss of each of its
    micro-batches (before backward) and the gradients (accumulated, after the DDP all-reduce).
    Every rank takes the same decision, so ranks never diverge.

    plpost's stage modules add one with the defaults unless the Trainer already has one, so a
    NaN stops a run by default; give your own to skip instead (``trainer.callbacks`` in YAML).

    Args:
        on_non_finite: "error" stops training with a NonFiniteError naming the global step and
            the records of the step's batches (their `record_index` or `pair_index`). "skip"
            drops the step: its gradients are discarded before the optimizer runs, so weights
            and optimizer state (moments, step counts) stay exactly as they were, while the
            global step and the learning-rate schedule advance, as with fp16 loss-scaling
            skips. Skipped steps are logged as `train/skipped_steps` and kept in checkpoints.

    Under fp16 mixed precision the GradScaler already skips steps whose gradients overflow
    (and lowers its scale), which is routine there, so only the losses are checked.
    """

    def __init__(self, on_non_finite: OnNonFinite = "error") -> None:
        if on_non_finite not in ("error", "skip"):
            raise ValueError(f"on_non_finite must be 'error' or 'skip', got {on_non_finite!r}")
        self.on_non_finite = on_non_finite
        self.skipped_steps = 0
        self._records: list[Tensor | None] = []  # record indices of the micro-batches of this step
        self._loss_not_finite: Tensor | None = None  # kept on the device: no sync per micro-batch
        self._stepped = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped:  # the first micro-batch of a new optimizer step
            self._records, self._loss_not_finite, self._stepped = [], None, False
        self._records.append(batch_records(batch))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        not_finite = ~torch.isfinite(loss.detach()).all()
        self._loss_not_finite = not_finite if self._loss_not_finite is None else self._loss_not_finite | not_finite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_here = bool(self._loss_not_finite) if self._loss_not_finite is not None else False
        gradients_here = False
        # A sharded gradient is checked on this rank's shard (the decision is reduced over ranks
        # below), which may be empty: a small head split over more ranks than it has rows.
        gradients = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters]
        gradients = [g for g in gradients if g.numel()]
        if gradients and getattr(trainer.precision_plugin, "scaler", None) is None:
            # The largest |gradient|: NaN or inf exactly when some gradient is, and it cannot overflow.
            largest = torch.nn.utils.get_total_norm(gradients, norm_type=float("inf"))
            gradients_here = not bool(torch.isfinite(largest))
        self._loss_not_finite, self._stepped = None, True
        if trainer.strategy.reduce_boolean_decision(loss_here or gradients_here, all=False):
            problem = self.describe(trainer, pl_module, loss_here, gradients_here)
            if self.on_non_finite == "error":
                raise NonFiniteError(problem)
            for parameter in parameters:
                parameter.grad = None  # torch optimizers leave parameters without a gradient untouched
            self.skipped_steps += 1
            rank_zero_warn(f"{problem}; the step was skipped ({self.skipped_steps} so far)")
        if self.on_non_finite == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def describe(self, trainer: L.Trainer, pl_module: L.LightningModule, loss_here: bool, gradients_here: bool) -> str:
        if loss_here:
            what = "loss"
        elif gradients_here:
            names = [n for n, p in pl_module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            what = f"gradients (of {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        else:
            what = "loss or gradients on another rank"
        records = [index.tolist() if index is not None else None for index in self._records]
        data = getattr(trainer.datamodule, "train_source", None)
        source = f" of {describe(data)}" if data is not None else ""
        if any(index is None for index in records):
            held = "records unknown (the batches carry no record_index or pair_index)"
        else:
            held = f"records {sorted({i for index in records for i in index})}{source}"
        return (
            f"non-finite {what} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"rank {trainer.global_rank}); the step's batches hold {held}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]


def batch_records(batch: Any) -> Tensor | None:
    """The record indices a batch carries (e.g. `ChatBatch.record_index`), or None."""
    for field in RECORD_FIELDS:
        index = getattr(batch, field, None)
        if isinstance(index, Tensor):
            return index
    return None
