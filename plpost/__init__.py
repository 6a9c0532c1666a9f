"""plpost: PyTorch Lightning components for post-training language models."""

from plpost.data import ChatDataModule
from plpost.modules import SFTModule

__all__ = ["ChatDataModule", "SFTModule"]
