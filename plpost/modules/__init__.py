from plpost.modules.base import LoraSettings, PostTrainingModule
from plpost.modules.distillation import DistillationModule
from plpost.modules.dpo import DPOModule
from plpost.modules.grpo import GRPOModule
from plpost.modules.kto import KTOModule
from plpost.modules.ppo import PPOModule
from plpost.modules.reward import RewardModule
from plpost.reward_head import sequence_rewards
from plpost.modules.sft import SFTModule

__all__ = [
    "DPOModule", "DistillationModule", "GRPOModule", "KTOModule", "LoraSettings", "PPOModule", "PostTrainingModule", "RewardModule", "SFTModule", "sequence_rewards",
]
