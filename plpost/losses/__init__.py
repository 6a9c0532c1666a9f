"""Pure loss functions of tensors: log-probs, SFT, reward modelling, DPO, PPO, GRPO and its variants, importance
weights, entropy-aware updates, advantages, distillation."""

from plpost.losses.advantages import (
    GroupStatistics,
    MomentSums,
    gae,
    group_advantages,
    group_statistics,
    leave_one_out_advantages,
    moment_sums,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_returns,
)
from plpost.losses.distillation import DIVERGENCES, Divergence, token_divergence
from plpost.losses.dpo import DPO_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, DPOLoss, chosen_nll, dpo_loss, log1mexp
from plpost.losses.grpo import (
    GRPO_LOSS_TYPES,
    GRPOTokenLosses,
    LossTerms,
    grpo_loss_denominator,
    grpo_loss_terms,
    grpo_token_losses,
    loss_scope,
)
from plpost.losses.entropy import entropy_bonus_terms, entropy_threshold, top_entropy_mask
from plpost.losses.importance import (
    IMPORTANCE_SAMPLING_LEVELS,
    OFF_POLICY_MODES,
    SamplerMismatch,
    importance_log_weights,
    off_policy_weights,
    sampler_mismatch,
)
from plpost.losses.kto import KTOLoss, kto_loss, kto_reference_point
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
    per_token_rewards,
    ppo_policy_loss,
)
from plpost.losses.reward import RewardLoss, bradley_terry_loss, reward_centering_penalty
from plpost.losses.sft import SFTTokenLosses, sft_token_losses

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "OFF_POLICY_MODES",
    "SamplerMismatch",
    "MomentSums",
    "entropy_bonus_terms",
    "entropy_threshold",
    "top_entropy_mask",
    "importance_log_weights",
    "off_policy_weights",
    "sampler_mismatch",
    "moment_sums",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_returns",
    "DIVERGENCES",
    "DPO_LOSS_TYPES",
    "Divergence",
    "DPOLoss",
    "GRPO_LOSS_TYPES",
    "GRPOTokenLosses",
    "GroupStatistics",
    "KL_ESTIMATORS",
    "KTOLoss",
    "LossTerms",
    "PolicyLoss",
    "REFERENCE_FREE_LOSS_TYPES",
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
    "group_advantages",
    "group_statistics",
    "grpo_loss_denominator",
    "grpo_loss_terms",
    "grpo_token_losses",
    "kl_penalty",
    "kto_loss",
    "kto_reference_point",
    "leave_one_out_advantages",
    "log1mexp",
    "loss_scope",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "next_token_targets",
    "per_token_rewards",
    "ppo_policy_loss",
    "reward_centering_penalty",
    "sequence_logprobs",
    "token_divergence",
    "sft_token_losses",
    "token_entropy",
    "token_logprobs",
]
