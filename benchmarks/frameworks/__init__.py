"""One module per framework; each `run(...)` trains one stage for preset.steps optimizer steps and
reports every batch and every step end to the shared StepClock."""

from __future__ import annotations

from functools import partial

import torch

from benchmarks.presets import Preset

DPO_BETA = 0.1
"""The DPO inverse temperature in every framework (sigmoid loss)."""


def adamw(preset: Preset):
    """The optimizer every framework uses: AdamW, constant learning rate, no weight decay, no clipping."""
    return partial(torch.optim.AdamW, lr=preset.learning_rate, weight_decay=0.0, fused=preset.fused_adamw or None)


def attention_implementation() -> str:
    return "sdpa"
