"""Preference pairs with their prompt computed once: one row of prompt + chosen + rejected per pair.

A padded PreferenceBatch holds 2N rows, so every prompt goes through the model twice, once before
each completion. In causal attention the prompt's hidden states do not depend on what follows,
so one row per pair can hold the prompt, then the chosen completion, then the rejected one, with
an attention mask under which the rejected tokens see the prompt and themselves but never the
chosen tokens, and position ids that restart the rejected completion where the prompt ends.
Every completion token then sees exactly what it sees in its own padded row: the rewards (and
gradients) are those of the padded layout, and the prompt costs one pass instead of two. With
prompts a third of a sequence, that is about a sixth fewer tokens, and no row is padded to the
longer of the two completions.

The mask is a custom 4D (N, 1, T, T) mask, which transformers hands to the attention kernel as
it is; "sdpa" takes it as booleans (True: may attend), "eager" as additive floats.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from plpost.data.preference import PreferenceBatch
from plpost.data.tokenize import IGNORE_INDEX

SHARED_PROMPT_ATTENTION = ("sdpa", "eager")
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


class SharedPromptRows(NamedTuple):
    """N pairs as N rows of prompt + chosen + rejected, right-padded to T.

    input_ids, position_ids, segments: (N, T). segments say which part each position belongs to
    (PROMPT, CHOSEN, REJECTED or PADDING); position ids count from the prompt's first token, and
    the rejected completion's restart where the prompt ends.
    allowed: (N, 1, T, T) bool, True where query position q may attend to key position k: k <= q,
    k is not padding, and a rejected token never attends to a chosen one. Each padding position
    attends to itself only, so no attention row is empty.
    chosen_end, rejected_end: (N,) the position of the last token of each completion.
    """

    input_ids: Tensor
    position_ids: Tensor
    segments: Tensor
    allowed: Tensor
    chosen_end: Tensor
    rejected_end: Tensor

    def attention_mask(self, attn_implementation: str, dtype: torch.dtype) -> Tensor:
        """`allowed` in the form the attention implementation takes a custom 4D mask in."""
        check_shared_prompt_attention(attn_implementation)
        if attn_implementation == "sdpa":
            return self.allowed
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self.allowed.device)
        return torch.where(self.allowed, torch.zeros((), dtype=dtype, device=self.allowed.device), blocked)


def check_shared_prompt_attention(attn_implementation: str) -> None:
    """Refuses an attention implementation that does not take a custom 4D mask."""
    if attn_implementation not in SHARED_PROMPT_ATTENTION:
        raise ValueError(
            f"share_prompt needs attn_implementation in {SHARED_PROMPT_ATTENTION} (a custom attention mask); the "
            f"model uses {attn_implementation!r}: set share_prompt to false, or change attn_implementation"
        )


def share_prompts(batch: PreferenceBatch, pad_token_id: int) -> SharedPromptRows:
    """The pairs of `batch` (padded on either side) in the shared-prompt layout, built on the
    batch's device with tensor operations only (one host sync, for the row width).

    A row's prompt is its real tokens before its first supervised label; the chosen and rejected
    rows of a pair must hold the same prompt, as PreferenceDataModule builds them.
    """
    pairs = batch.input_ids.shape[0] // 2
    real = batch.attention_mask.bool()
    lengths = real.sum(-1)
    first_real = real.int().argmax(-1)
    prompt = (batch.labels != IGNORE_INDEX).int().argmax(-1) - first_real
    chosen_length, rejected_length = lengths[:pairs], lengths[pairs:] - prompt[pairs:]
    shared_length = chosen_length + rejected_length
    position = torch.arange(int(shared_length.max()), device=batch.input_ids.device)[None]
    in_chosen_row = position < chosen_length[:, None]
    source_row = torch.where(in_chosen_row, 0, pairs) + torch.arange(pairs, device=position.device)[:, None]
    source_position = torch.where(
        in_chosen_row, first_real[:pairs, None] + position,
        first_real[pairs:, None] + prompt[pairs:, None] + position - chosen_length[:, None],
    )
    real_position = position < shared_length[:, None]
    source_position = torch.where(real_position, source_position, 0)
    input_ids = torch.where(real_position, batch.input_ids[source_row, source_position], pad_token_id)
    position_ids = torch.where(
        in_chosen_row, position, prompt[pairs:, None] + position - chosen_length[:, None]
    ).masked_fill(~real_position, 0)
    segments = torch.full_like(input_ids, PADDING)
    segments = segments.masked_fill(real_position, REJECTED).masked_fill(in_chosen_row, CHOSEN)
    segments = segments.masked_fill(position < prompt[:pairs, None], PROMPT)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(position.shape[1], position.shape[1], dtype=torch.bool, device=position.device).tril()
    allowed = causal & (query != PADDING) & (key != PADDING) & ~((query == REJECTED) & (key == CHOSEN))
    allowed |= torch.eye(position.shape[1], dtype=torch.bool, device=position.device)
    return SharedPromptRows(input_ids, position_ids, segments, allowed[:, None], chosen_length - 1, shared_length - 1)
