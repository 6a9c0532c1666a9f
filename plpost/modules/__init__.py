from plpost.modules.base import PostTrainingModule
from plpost.modules.distillation import DistillationModule
from plpost.modules.dpo import DPOModule
from plpost.modules.grpo import GRPOModule
from plpost.modules.kto import KTOModule
from plpost.modules.ppo import PPOModule
from plpost.modules.reward import RewardModule
from plpost.modules.settings import LoraSettings, ModelSettings
from plpost.modules.sft import SFTModule
from plpost.reward_head import sequence_rewards

__all__ = [
    "DPOModule", "DistillationModule", "GRPOModule", "KTOModule", "LoraSettings", "ModelSettings", "PPOModule", "PostTrainingModule", "RewardModule", "SFTModule", "sequence_rewards",
]
