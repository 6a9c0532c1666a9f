"""Progress that says something: throughput in the progress bar, and a bar per stage of a pipeline."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import Tensor

TOKENS_BAR_NAME = "tok/s"
EPISODES_BAR_NAME = "ep/s"
TOKENS_METRIC = "perf/tokens_per_s"


def real_tokens(batch: Any) -> Tensor | None:
    """The non-pad tokens of a collated batch: the ones of its attention mask, or every token of a
    packed batch (no mask, no padding); None for a batch with neither (e.g. not plpost's)."""
    mask = getattr(batch, "attention_mask", None)
    if isinstance(mask, Tensor):
        return mask.sum()
    input_ids = getattr(batch, "input_ids", None)
    return input_ids.new_tensor(input_ids.numel()) if isinstance(input_ids, Tensor) else None


class Throughput(L.Callback):
    """Shows training throughput in the progress bar, next to the loss the stage shows there.

    Token stages (SFT, reward model, DPO): `tok/s`, the real (non-pad) tokens of the training
    batches of all processes per second of wall time, also logged as `perf/tokens_per_s`.
    A stage that counts its episodes in an `episodes` buffer (PPO; any stage can: the count
    over all processes so far) shows `ep/s` instead, episodes (responses) per second.
    Rates are over the last `window` training batches, so the first batch's start-up cost
    (loading, compiling) leaves the figure once `window` batches have passed.

    plpost's stage modules add one with the defaults unless the Trainer already has one.

    Args:
        window: how many recent training batches the rate is measured over.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._points: deque[tuple[float, float]] = deque(maxlen=window + 1)
        self._total = 0.0
        self._clock = time.perf_counter

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = 0.0
        self._points.clear()
        self._points.append((self._clock(), self.count(trainer, pl_module, None)))

    def count(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> float:
        """Episodes so far (the module's own count), or tokens so far (summed here over processes)."""
        episodes = getattr(pl_module, "episodes", None)
        if isinstance(episodes, Tensor):
            return float(episodes)
        tokens = real_tokens(batch) if batch is not None else None
        if tokens is not None:
            # Every process reaches this line at the same batch, as the collective needs.
            self._total += float(trainer.strategy.reduce(tokens.float(), reduce_op="sum"))
        return self._total

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        episodes = isinstance(getattr(pl_module, "episodes", None), Tensor)
        if not episodes and real_tokens(batch) is None:
            return
        self._points.append((self._clock(), self.count(trainer, pl_module, batch)))
        (start, first), (now, last) = self._points[0], self._points[-1]
        rate = (last - first) / max(now - start, 1e-9)
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        if episodes:
            pl_module.log(EPISODES_BAR_NAME, round(rate, 1), prog_bar=True, logger=False, **log)
        else:
            pl_module.log(TOKENS_BAR_NAME, float(round(rate)), prog_bar=True, logger=False, **log)
            pl_module.log(TOKENS_METRIC, rate, **log)


class StageProgressBar(TQDMProgressBar):
    """One bar for a whole stage of a pipeline (every epoch), labelled with the stage, with the
    time left; e.g. ``[2/4] reward model  37%|███▋      | 41/111 [00:05<00:09, ...]``.

    The bar counts training batches. Its total is the batches of every epoch, or fewer when
    `max_steps` ends the run first: then it is measured from the optimizer steps a batch has
    taken so far (several per batch for PPO), so the time left holds whatever the stage.
    Validation runs without a bar of its own.

    Args:
        label: what the bar's description says, e.g. "[1/4] SFT".
    """

    def __init__(self, label: str, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=True)
        self.label = label
        self._batches = 0

    @property
    def train_description(self) -> str:
        return self.label

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def stage_total(self, trainer: L.Trainer) -> int | None:
        per_epoch = trainer.num_training_batches
        if per_epoch == math.inf:
            return None
        total = per_epoch * max(trainer.max_epochs or 1, 1)
        if trainer.max_steps > 0 and trainer.global_step > 0:
            batches_per_step = self._batches / trainer.global_step
            total = min(total, self._batches + math.ceil((trainer.max_steps - trainer.global_step) * batches_per_step))
        return int(total)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._batches = 0
        self.train_progress_bar.reset(self.stage_total(trainer))

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for every epoch: not reset, and the label stays

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        bar = self.train_progress_bar
        total = self.stage_total(trainer)
        if total is not None and total != bar.total:
            bar.total = total
        bar.n = self._batches
        if self._should_update(self._batches, bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number says nothing about progress
        return metrics
