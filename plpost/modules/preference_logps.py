"""Summed log-probabilities of completions: the chosen and rejected ones of preference pairs, or any rows.

Two layouts give the same numbers: two padded rows per pair (`pair_logps`), or one row of
prompt + chosen + rejected per pair with the prompt computed once (`shared_pair_logps`, see
`plpost.data.shared_prompt`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from plpost.data.preference import CompletionRows, PreferenceBatch
from plpost.data.shared_prompt import CHOSEN, PADDING, PROMPT, REJECTED, SharedPromptRows
from plpost.data.tokenize import IGNORE_INDEX
from plpost.losses import next_token_targets, sequence_logprobs, token_logprobs


class ChosenRejected(NamedTuple):
    """One value per pair for each side: (N,) chosen, (N,) rejected."""

    chosen: Tensor
    rejected: Tensor


def pair_logps(model: nn.Module, batch: PreferenceBatch) -> ChosenRejected:
    """log pi(y|x) of every chosen and rejected completion, summed over its completion tokens.

    ONE forward over the 2N rows of the batch (the N chosen, then the N rejected).
    """
    return ChosenRejected(*completion_logps(model, batch).chunk(2))


def completion_logps(model: nn.Module, rows: PreferenceBatch | CompletionRows) -> Tensor:
    """(rows,) log pi(y|x) of each row's completion (its labelled tokens), from one forward."""
    logits = model(
        input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids, use_cache=False,
    ).logits
    targets = completion_targets(rows)
    return sequence_logprobs(token_logprobs(logits, targets), targets != IGNORE_INDEX)


def shared_pair_logps(model: nn.Module, rows: SharedPromptRows, attention_mask: Tensor) -> ChosenRejected:
    """What `pair_logps` computes, from ONE forward over N prompt + chosen + rejected rows.

    attention_mask: `rows.attention_mask(...)` for the model's attention implementation.

    Every completion token is predicted by the position before it, except the first rejected
    token: the position before it is the last chosen token, but in its own row it follows the
    prompt, so its log-prob is read from the prompt's last position (which also predicts the
    first chosen token). With an empty prompt nothing predicts it, as in a padded row.
    """
    logits = model(
        input_ids=rows.input_ids, attention_mask=attention_mask, position_ids=rows.position_ids, use_cache=False
    ).logits
    segments = rows.segments
    next_segments = torch.cat([segments[:, 1:], torch.full_like(segments[:, :1], PADDING)], dim=1)
    next_ids = torch.cat([rows.input_ids[:, 1:], torch.full_like(rows.input_ids[:, :1], IGNORE_INDEX)], dim=1)
    within = (next_segments == CHOSEN) | ((next_segments == REJECTED) & (segments == REJECTED))
    logps = token_logprobs(logits, torch.where(within, next_ids, IGNORE_INDEX))
    chosen = (logps * (next_segments == CHOSEN)).sum(-1)
    pairs = torch.arange(segments.shape[0], device=segments.device)
    prompt_end = (segments == PROMPT).sum(-1) - 1
    first_rejected = token_logprobs(
        logits[pairs, prompt_end.clamp(min=0)][:, None], rows.input_ids[pairs, rows.chosen_end + 1][:, None]
    )[:, 0]
    rejected = logps.sum(-1) - chosen + torch.where(prompt_end >= 0, first_rejected, 0.0)
    return ChosenRejected(chosen, rejected)


def completion_targets(batch: PreferenceBatch | CompletionRows) -> Tensor:
    """(rows, T) next-token targets of the completion tokens. A padding position predicts nothing,
    also where a left-padded row's first real token is already a completion token (an empty prompt)."""
    return next_token_targets(batch.labels).masked_fill(batch.attention_mask == 0, IGNORE_INDEX)


def completion_lengths(batch: PreferenceBatch) -> ChosenRejected:
    """The completion tokens of each chosen and rejected row: the tokens `pair_logps` sums."""
    return ChosenRejected(*(completion_targets(batch) != IGNORE_INDEX).sum(-1).chunk(2))
