"""The shared-prompt layout: one row of prompt + chosen + rejected per pair, masked so that every
completion token sees exactly what it sees in its own row."""

import pytest
import torch

from plpost.data.preference import collate_preference
from plpost.data.shared_prompt import CHOSEN, PADDING, PROMPT, REJECTED, share_prompts

PAD = 0
# Pair 0: prompt 11 12, chosen 21 22 23, rejected 31. Pair 1: prompt 13, chosen 24, rejected 32 33.
EXAMPLES = [
    {"prompt_ids": [11, 12], "chosen_ids": [21, 22, 23], "rejected_ids": [31], "margin": None, "pair_index": 0},
    {"prompt_ids": [13], "chosen_ids": [24], "rejected_ids": [32, 33], "margin": None, "pair_index": 1},
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_rows_positions_segments_and_ends_written_out(padding_side):
    """Row 0 is 11 12 21 22 23 31 at positions 0 1 2 3 4 2 (the rejected completion restarts where
    the prompt ends); row 1 is 13 24 32 33 at 0 1 1 2, padded to 6. The rewards are read at the last
    chosen token (4 and 1) and the last rejected token (5 and 3)."""
    batch = collate_preference([(e, None) for e in EXAMPLES], pad_token_id=PAD, padding_side=padding_side)
    rows = share_prompts(batch, PAD)
    assert rows.input_ids.tolist() == [[11, 12, 21, 22, 23, 31], [13, 24, 32, 33, PAD, PAD]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    assert rows.segments.tolist() == [
        [PROMPT, PROMPT, CHOSEN, CHOSEN, CHOSEN, REJECTED],
        [PROMPT, CHOSEN, REJECTED, REJECTED, PADDING, PADDING],
    ]
    assert rows.chosen_end.tolist() == [4, 1] and rows.rejected_end.tolist() == [5, 3]


def test_each_token_attends_to_what_it_sees_in_its_own_padded_row():
    """Row 1 (13 | 24 | 32 33 | pad pad): 24 sees 13 and itself; 32 sees 13 and itself, not 24;
    33 sees 13, 32 and itself; each pad sees itself only (no attention row is empty)."""
    rows = share_prompts(collate_preference([(e, None) for e in EXAMPLES], pad_token_id=PAD), PAD)
    assert rows.allowed.shape == (2, 1, 6, 6)
    allowed = rows.allowed[1, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    # Row 0: the rejected token 31 (position 5) sees the prompt and itself, none of 21 22 23.
    assert rows.allowed[0, 0, 5].int().tolist() == [1, 1, 0, 0, 0, 1]


def test_eager_attention_gets_the_same_mask_as_additive_floats():
    rows = share_prompts(collate_preference([(e, None) for e in EXAMPLES], pad_token_id=PAD), PAD)
    additive = rows.attention_mask("eager", torch.float32)
    assert torch.equal(additive == 0, rows.allowed)
    assert (additive[~rows.allowed] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="share_prompt"):
        rows.attention_mask("flash_attention_2", torch.bfloat16)
