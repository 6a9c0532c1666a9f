"""Tests for plpost.losses.sft: per-token cross-entropy, masks, accuracy, normalisation."""

import math

import torch
import torch.nn.functional as F

from plpost.losses import next_token_targets, sft_token_losses

F64 = torch.float64


def test_by_hand():
    """Position 0: logits (2, 0, 0), target 0: p = e^2 / (e^2 + 2), loss = ln(1 + 2 e^-2), and the
    argmax is the target. Position 1: uniform, target 1: loss ln 3; argmax is token 0 (first of a
    tie), so not correct. Position 2: ignored: loss 0, unmasked, not correct."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]], dtype=F64)
    targets = torch.tensor([[0, 1, -100]])
    out = sft_token_losses(logits, targets)
    torch.testing.assert_close(
        out.losses, torch.tensor([[math.log(1 + 2 * math.exp(-2)), math.log(3.0), 0.0]], dtype=F64)
    )
    assert out.mask.tolist() == [[True, True, False]]
    assert out.correct.tolist() == [[True, False, False]]


def test_matches_cross_entropy():
    """Equal to torch's cross_entropy with reduction='none' (which is 0 on ignored targets)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 17, generator=g, dtype=F64)
    labels = torch.randint(0, 17, (3, 6), generator=g)
    labels[:, :2] = -100  # prompt tokens
    targets = next_token_targets(labels)
    out = sft_token_losses(logits, targets, chunk_size=5)
    ref = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    torch.testing.assert_close(out.losses, ref)
    assert torch.equal(out.mask, targets != -100)


def test_token_sum_normalisation_is_invariant_to_micro_batching():
    """Sequences with 1 and 3 supervised tokens. Summing token losses per micro-batch and dividing by
    the global token count (4) gives the full-batch mean whatever the split; averaging per micro-batch
    first and then over micro-batches weights the lone token of sequence 0 three times too much."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g, dtype=F64)
    targets = torch.tensor([[3, -100, -100, -100], [1, 2, 6, -100]])
    full = sft_token_losses(logits, targets)
    n_tokens = full.mask.sum()
    split = sum(sft_token_losses(logits[i : i + 1], targets[i : i + 1]).losses.sum() for i in range(2)) / n_tokens
    torch.testing.assert_close(split, full.losses.sum() / n_tokens)
    per_micro_batch = (
        sum(
            (o := sft_token_losses(logits[i : i + 1], targets[i : i + 1])).losses.sum() / o.mask.sum() for i in range(2)
        )
        / 2
    )
    assert not torch.isclose(per_micro_batch, full.losses.sum() / n_tokens)


def test_bf16_logits_give_float32_losses():
    logits = torch.randn(2, 3, 50).bfloat16()
    out = sft_token_losses(logits, torch.tensor([[1, 2, -100], [3, -100, -100]]))
    assert out.losses.dtype == torch.float32 and out.losses[0, 2] == 0
