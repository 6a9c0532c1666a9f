"""Token-level divergences between a student's and a teacher's next-token distributions, for
on-policy distillation (GKD, Agarwal et al. 2024), with TRL 1.16's conventions.

With s = softmax(student_logits / temperature) and t = softmax(teacher_logits / temperature) at
one position, and KL(p || q) = sum_v p_v (log p_v - log q_v):

- "forward_kl": KL(t || s), mean-seeking: the student covers every token the teacher likes.
- "reverse_kl": KL(s || t), mode-seeking: the student is penalised where it puts mass the teacher
  does not.
- "jsd": the generalised Jensen-Shannon divergence of GKD's Eq. (1), with the mixture
  m = beta * t + (1 - beta) * s and JSD_beta = beta * KL(t || m) + (1 - beta) * KL(s || m).
  beta weights the teacher's side, as in TRL's `generalized_jsd_loss` (beta = 0.5: the symmetric
  JSD). 0 <= JSD_beta <= h(beta) = -beta ln beta - (1 - beta) ln(1 - beta) <= ln 2.

TRL's `beta` selects all three: beta = 0 is "forward_kl" and beta = 1 is "reverse_kl". Those are
not the values of the JSD formula at 0 and 1 (it vanishes at both ends) but its limits divided by
the vanishing weight: JSD_beta / beta -> KL(t || s) as beta -> 0, and JSD_beta / (1 - beta) ->
KL(s || t) as beta -> 1. So `token_divergence(..., "jsd", beta=b)` equals TRL's value at b for
0 < b < 1, and "forward_kl" / "reverse_kl" equal TRL's at 0 / 1.

Memory: the float32 log-softmax of both models' logits is taken at the masked positions only
(N x V each, plus the mixture for "jsd"); unlike `token_logprobs` it is not chunked, so the
micro-batch bounds the cost (TRL's DistillationTrainer chunks over the vocabulary instead).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

__all__ = ["DIVERGENCES", "Divergence", "token_divergence"]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_v p_v (log p_v - log q_v) over the last dim; a token with p_v = 0 contributes 0."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(-1)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    divergence: Divergence,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Divergence of the student's next-token distribution from the teacher's at each position.

    student_logits, teacher_logits: (B, T, V), any float dtype, aligned (position t of both
    predicts the same token); mask: (B, T) bool or 0/1, the positions in the loss.
    divergence: "forward_kl", "reverse_kl" or "jsd" (see the module docstring); beta: the JSD's
    weight of the teacher, 0 < beta < 1, read by "jsd" only; temperature: both logits are divided
    by it before the softmax.
    Returns (B, T) divergences in nats, float32 (float64 for float64 logits), exactly 0 where
    `mask` is 0 (whatever the logits hold there). Differentiable in both logits (the stage passes
    teacher logits computed without gradients). Unreduced: the caller chooses the normalisation.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (the same vocabulary)")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must match the logits {tuple(student_logits.shape)} without the vocab dim")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"the JSD's beta must be strictly between 0 and 1, got {beta}: its limits are "
                         "divergence 'forward_kl' (TRL's beta 0) and 'reverse_kl' (TRL's beta 1)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = mask.to(torch.bool)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    # Only the masked rows are upcast: padding and prompt positions never reach the softmax.
    log_s = torch.log_softmax(student_logits[keep].to(dtype) / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits[keep].to(dtype) / temperature, dim=-1)
    if divergence == "forward_kl":
        values = _kl(log_t, log_s)
    elif divergence == "reverse_kl":
        values = _kl(log_s, log_t)
    else:
        # log m around the larger of log t and log s: log m = log s + log1p(beta * expm1(log t - log s))
        # where t <= s (and the mirror image elsewhere), so m is exactly s when t == s (a logsumexp
        # of the two weighted terms rounds, leaving a JSD of 1e-8 between identical models), and
        # expm1 only ever sees a non-positive argument (it cannot overflow).
        gap = log_t - log_s
        weight = torch.where(gap <= 0, gap.new_tensor(beta), gap.new_tensor(1 - beta))  # in float64 with float64
        log_m = torch.maximum(log_t, log_s) + torch.log1p(weight * torch.expm1(-gap.abs()))
        values = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    out = torch.zeros(keep.shape, dtype=dtype, device=values.device)
    return out.index_put((keep,), values)
