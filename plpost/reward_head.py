"""Reading a scalar reward off a `*ForSequenceClassification` model: its backbone, then its score head
at each row's last real token. Below both the reward stage (`plpost.modules.reward`, which trains
such a model) and the reward sources of the online stages (`plpost.rewards`, which score with one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

SCORE_HEAD = "score"


def sequence_rewards(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
) -> Tensor:
    """(rows,) rewards: the score head of a `*ForSequenceClassification` model at each row's last real token.

    input_ids, attention_mask: (rows, time), padded on either side. The last real token is the
    last position where attention_mask is 1. Hugging Face's own pooling instead looks for the
    last token that is not the pad id, which is wrong when pad == eos and rows end with eos,
    so the backbone (`model.base_model`) and the head (`model.score`) are called here directly;
    the head then runs on one hidden state per row rather than on every position.
    position_ids default to positions counted from each row's first real token, so a
    left-padded row gets the reward it has unpadded. `model` may be wrapped by peft.
    """
    classifier, head = backbone_and_head(model)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = classifier.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    time = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    last_real = (time * attention_mask.bool()).argmax(-1)  # the largest position where the mask is 1
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real]).squeeze(-1)


def backbone_and_head(model: nn.Module) -> tuple[PreTrainedModel, nn.Module]:
    """The `*ForSequenceClassification` model under any peft wrapper, and its score head."""
    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(classifier, SCORE_HEAD, None)
    if head is None or classifier.base_model is classifier:
        raise TypeError(
            f"{type(classifier).__name__} has no `base_model` backbone with a `{SCORE_HEAD}` head; plpost reads "
            "rewards from *ForSequenceClassification models built that way (Llama, Qwen2, Mistral, Gemma, ...)"
        )
    return classifier, head
