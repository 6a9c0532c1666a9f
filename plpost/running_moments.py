"""Running statistics of the scores the online stages optimise (PPO's reward normalisation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RunningMoments(nn.Module):
    """Running mean and variance of every value seen (Chan et al.'s parallel update), float64 buffers.

    Written by hand: torchmetrics has running means but no running variance to normalise with.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    def update(self, values: Tensor) -> None:
        """values: any shape; merged as a batch of its values that are not NaN."""
        values = values.detach().to(torch.float64).flatten()
        values = values[~torch.isnan(values)]
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean()
        batch_m2 = (values - batch_mean).square().sum()
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + delta.square() * self.count * n / total
        self.mean += delta * n / total
        self.count.copy_(total)

    @property
    def std(self) -> Tensor:
        """Population standard deviation (1/n) of everything seen."""
        return (self.m2 / self.count.clamp(min=1)).sqrt()
