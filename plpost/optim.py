"""Learning-rate schedules that LightningCLI injects as `LRSchedulerCallable`s."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warmup from 0 to the optimizer's learning rate, then cosine decay to `min_lr_ratio` of it.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        warmup_steps: optimizer steps of linear warmup.
        total_steps: optimizer steps of the whole run; None takes the Trainer's estimate
            (`estimated_stepping_batches`), filled in by the module before the first step.
        min_lr_ratio: the final learning rate as a fraction of the peak.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None, min_lr_ratio: float = 0.0
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.multiplier)

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound `multiplier`; the schedule is fully described by its fields.
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
