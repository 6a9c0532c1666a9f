"""The recipe options of `GRPOModule` that act outside its loss function: which settings go
together, the per-token weights (off-policy correction, top-entropy mask), and REINFORCE++'s
per-token advantages over every device. Each is a thin layer over `plpost.losses`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from plpost.losses import IMPORTANCE_SAMPLING_LEVELS, OFF_POLICY_MODES, MomentSums, entropy_threshold, moment_sums
from plpost.losses import off_policy_weights, reinforce_plus_plus_advantages, reinforce_plus_plus_returns
from plpost.losses import sampler_mismatch, top_entropy_mask


def check_recipe(hp) -> None:
    """Refuses, at construction, the recipe settings that cannot work together."""
    reinforce = hp.advantage_estimator.startswith("reinforce_plus_plus")
    if hp.advantage_estimator not in ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        raise ValueError(f"unknown advantage_estimator {hp.advantage_estimator!r}; expected grpo, rloo, "
                         f"reinforce_plus_plus or reinforce_plus_plus_baseline")
    if (hp.advantage_estimator == "rloo" or reinforce) and hp.scale_rewards != "none":
        raise ValueError(f"{hp.advantage_estimator}'s advantages are not scaled by scale_rewards: set scale_rewards: "
                         f"none with advantage_estimator: {hp.advantage_estimator}")
    if hp.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {hp.importance_sampling_level!r}")
    if hp.loss_type == "cispo" and not hp.epsilon_high > 1:
        raise ValueError(f"loss_type 'cispo' caps the importance weight itself at epsilon_high, which must be > 1 "
                         f"(ScaleRL: 5.0), got {hp.epsilon_high}")
    if not 0.0 <= hp.top_entropy_quantile <= 1.0 or hp.entropy_coef < 0:
        raise ValueError("top_entropy_quantile must be in [0, 1] and entropy_coef >= 0")
    if not (hp.sapo_temperature_pos > 0 and hp.sapo_temperature_neg > 0):
        raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be > 0")
    if hp.off_policy_correction is not None:
        if hp.off_policy_correction not in OFF_POLICY_MODES:
            raise ValueError(f"unknown off_policy_correction {hp.off_policy_correction!r}; expected one of "
                             f"{', '.join(OFF_POLICY_MODES)}")
        low, high = hp.off_policy_clip_min, hp.off_policy_clip_max
        if low is not None and high is not None and not low < high:
            raise ValueError(f"off_policy_clip_min ({low}) must be below off_policy_clip_max ({high})")


def token_weights(hp, mask: Tensor, old: Tensor | None, sampler: Tensor | None, entropies: Tensor | None, *,
                  gather: Callable[[Tensor], Tensor]):
    """(B * G, R) or (B * G, 1) constants the policy loss of each token is multiplied by (the
    off-policy correction of `old` against the `sampler`'s log-probs, the top-entropy mask of the
    sampling policy's `entropies`; None when neither is on), and their statistics. gather: the
    module's all_gather, so the entropy threshold is that of every device's tokens."""
    weights, stats = None, {}
    if hp.off_policy_correction is not None:
        weights = off_policy_weights(old, sampler, mask, mode=hp.off_policy_correction,
                                     clip_min=hp.off_policy_clip_min, clip_max=hp.off_policy_clip_max)
        mismatch = sampler_mismatch(old, sampler, mask, weights)
        stats.update({"sampling/sampling_logp_difference/mean": mismatch.logp_difference_mean,
                      "sampling/sampling_logp_difference/max": mismatch.logp_difference_max,
                      "sampling/importance_sampling_ratio/min": mismatch.ratio_min,
                      "sampling/importance_sampling_ratio/mean": mismatch.ratio_mean,
                      "sampling/importance_sampling_ratio/max": mismatch.ratio_max})
    if entropies is not None:
        threshold = batch_entropy_threshold(entropies, mask, quantile=hp.top_entropy_quantile, gather=gather)
        keep = top_entropy_mask(entropies, mask, quantile=hp.top_entropy_quantile, threshold=threshold)
        weights = keep.to(entropies.dtype) if weights is None else weights * keep
        stats["entropy_mask/kept"] = keep.sum().float() / mask.sum().clamp(min=1).float()
    return weights, stats


def batch_entropy_threshold(entropies: Tensor, mask: Tensor, *, quantile: float,
                            gather: Callable[[Tensor], Tensor]) -> Tensor:
    """tau_rho over the unmasked entropies of every device (padded with -1, never an entropy)."""
    local = entropies[mask]
    size = gather(torch.tensor(local.numel(), device=local.device)).reshape(-1)
    padded = torch.cat([local, local.new_full((int(size.max()) - local.numel(),), -1.0)])
    everything = gather(padded).reshape(-1)
    kept = everything[everything >= 0]
    return entropy_threshold(kept, torch.ones_like(kept, dtype=torch.bool), quantile=quantile)


def token_advantages(scores: Tensor, mask: Tensor, token_kl: Tensor | None, *, beta: float,
                     global_sum: Callable[[Tensor], Tensor]) -> Tensor:
    """REINFORCE++'s (B * G, R) advantages of one score per completion (NaN: no reward, left out),
    normalised with the sums of every device (`global_sum`)."""
    valid = mask & ~torch.isnan(scores)[:, None]
    returns = reinforce_plus_plus_returns(scores, valid, token_kl=token_kl, beta=beta)
    sums = MomentSums(*global_sum(torch.stack(moment_sums(returns, valid))).double())
    return reinforce_plus_plus_advantages(returns, valid, sums=sums)
