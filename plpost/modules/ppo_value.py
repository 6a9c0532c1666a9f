"""PPO's value function: a scalar head on the policy's backbone, or a separate critic model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from plpost.reward_head import SCORE_HEAD


class ValueHead(nn.Module):
    """V(s) = w . h + b on the policy's last hidden state h, one value per position.

    Zero-initialised, so V = 0 everywhere at the start: before it has learnt anything the critic
    says nothing, rather than adding random noise to every advantage.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden: (B, R, H) -> (B, R) float32 values."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


def critic_values(
    critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_length: int
) -> Tensor:
    """(B, R) float32 values V(s_t) before each of the R response tokens, from a critic's score head.

    The head runs on the R positions that precede the response tokens (positions P - 1 ... P + R - 2
    of the (B, P + R) input), as the policy's logits do, so V(s_t) sees exactly what predicts
    token t. `critic` may be wrapped by peft.
    """
    classifier = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    head = getattr(classifier, SCORE_HEAD, None)
    if head is None or classifier.base_model is classifier:
        raise TypeError(f"{type(classifier).__name__} has no `base_model` with a `{SCORE_HEAD}` head to read values from")
    hidden = classifier.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return head(hidden[:, -(response_length + 1) : -1]).squeeze(-1).float()


def zero_where_not(mask: Tensor, values: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
