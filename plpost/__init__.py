"""plpost: PyTorch Lightning components for post-training language models."""

from plpost.data import ChatDataModule, FeedbackDataModule, PreferenceDataModule, PromptDataModule
from plpost.modules import DistillationModule, DPOModule, GRPOModule, KTOModule, PPOModule, RewardModule, SFTModule

__all__ = [
    "ChatDataModule",
    "DPOModule",
    "DistillationModule",
    "FeedbackDataModule",
    "GRPOModule",
    "KTOModule",
    "PPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "RewardModule",
    "SFTModule",
]
