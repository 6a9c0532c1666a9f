from plpost.modules.base import LoraSettings, PostTrainingModule
from plpost.modules.sft import SFTModule

__all__ = ["LoraSettings", "PostTrainingModule", "SFTModule"]
