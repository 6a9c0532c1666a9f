"""Batches as NamedTuples of tensors, padded to the longest row (or packed without padding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from plpost.data.tokenize import IGNORE_INDEX


class ChatBatch(NamedTuple):
    """Supervised token sequences.

    input_ids, labels, position_ids: (rows, time). labels hold IGNORE_INDEX where unsupervised
    and are aligned with input_ids (the module shifts them to next-token targets).
    attention_mask: (rows, time), or None for a packed batch, whose sequences are told apart by
    position_ids restarting at 0 (the model then attends only within each sequence).
    loss_normalizer: scalar, the loss tokens of the whole optimizer step (all micro-batches
    and devices) when the sampler knows it, else this batch's own loss tokens.
    record_index: (sequences,) the record index of each sequence in its source, in batch order
    (one per row, or one per packed sequence), so errors can name the records of a batch; None
    for examples that do not carry one.
    """

    input_ids: Tensor
    attention_mask: Tensor | None
    labels: Tensor
    position_ids: Tensor
    loss_normalizer: Tensor
    record_index: Tensor | None = None


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, left: bool = False, multiple_of: int = 1) -> Tensor:
    """(len(rows), longest) long tensor; `left` pads at the start, as generation needs."""
    longest = max(len(row) for row in rows)
    longest = -(-longest // multiple_of) * multiple_of
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            target = out[i, longest - len(row) :] if left else out[i, : len(row)]
            target.copy_(torch.as_tensor(row, dtype=torch.long))
    return out


def count_loss_tokens(labels: Sequence[int]) -> int:
    """Supervised tokens that are next-token targets: the first token is never predicted."""
    return max(0, len(labels) - 1 - list(labels[1:]).count(IGNORE_INDEX))


def collate_chat(
    items: Sequence[tuple[dict, float | None]], *, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int = 1
) -> ChatBatch:
    examples = [example for example, _ in items]
    window_weight = items[0][1]
    if window_weight is None:
        window_weight = sum(count_loss_tokens(example["labels"]) for example in examples)
    normalizer = torch.tensor(float(window_weight))
    has_index = all("record_index" in example for example in examples)
    record_index = torch.tensor([e["record_index"] for e in examples], dtype=torch.long) if has_index else None
    if packing:
        input_ids = torch.tensor([[t for e in examples for t in e["input_ids"]]], dtype=torch.long)
        # The first label of each sequence is cleared so the last token of one sequence is never
        # trained to predict the first token of the next.
        labels = torch.tensor([[label for e in examples for label in [IGNORE_INDEX, *e["labels"][1:]]]], dtype=torch.long)
        position_ids = torch.tensor([[p for e in examples for p in range(len(e["input_ids"]))]], dtype=torch.long)
        return ChatBatch(input_ids, None, labels, position_ids, normalizer, record_index)
    input_ids = pad_rows([e["input_ids"] for e in examples], pad_token_id, multiple_of=pad_to_multiple_of)
    labels = pad_rows([e["labels"] for e in examples], IGNORE_INDEX, multiple_of=pad_to_multiple_of)
    attention_mask = pad_rows([[1] * len(e["input_ids"]) for e in examples], 0, multiple_of=pad_to_multiple_of)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return ChatBatch(input_ids, attention_mask, labels, position_ids, normalizer, record_index)
