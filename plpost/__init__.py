"""plpost: PyTorch Lightning components for post-training language models."""

from plpost.data import ChatDataModule, PreferenceDataModule, PromptDataModule
from plpost.modules import DistillationModule, DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule

__all__ = [
    "ChatDataModule",
    "DPOModule",
    "DistillationModule",
    "GRPOModule",
    "PPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "RewardModule",
    "SFTModule",
]
