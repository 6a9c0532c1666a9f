"""Pure loss functions of tensors: log-probs, SFT, reward modelling, DPO, PPO, advantages."""

from plpost.losses.advantages import gae
from plpost.losses.dpo import DPO_LOSS_TYPES, DPOLoss, chosen_nll, dpo_loss
from plpost.losses.logprobs import next_token_targets, sequence_logprobs, token_entropy, token_logprobs
from plpost.losses.masked import masked_mean, masked_sum, masked_var, masked_whiten
from plpost.losses.ppo import (
    KL_ESTIMATORS,
    PolicyLoss,
    ValueLoss,
    adaptive_kl_coefficient,
    clipped_value_loss,
    explained_variance,
    kl_penalty,
    ppo_policy_loss,
)
from plpost.losses.reward import RewardLoss, bradley_terry_loss, reward_centering_penalty
from plpost.losses.sft import SFTTokenLosses, sft_token_losses

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOLoss",
    "KL_ESTIMATORS",
    "PolicyLoss",
    "RewardLoss",
    "SFTTokenLosses",
    "ValueLoss",
    "adaptive_kl_coefficient",
    "bradley_terry_loss",
    "chosen_nll",
    "clipped_value_loss",
    "dpo_loss",
    "explained_variance",
    "gae",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "next_token_targets",
    "ppo_policy_loss",
    "reward_centering_penalty",
    "sequence_logprobs",
    "sft_token_losses",
    "token_entropy",
    "token_logprobs",
]
