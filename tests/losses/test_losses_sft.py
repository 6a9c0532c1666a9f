"""Tests for plpost.losses.sft: per-token cross-entropy, masks, accuracy, normalisation."""

import math

import torch
import torch.nn.functional as F

from plpost.losses import next_token_targets, sft_token_losses

F64 = torch.float64


def test_by_hand():
    """Position 0: logits (2, 0, 0), target 0: p = e^2 / (e^2 + 2), loss = ln(1 + 2 e^-2), and the
    target has the largest logit. Position 1: uniform, target 1: loss ln 3; the target is tied for
    the largest logit, which counts as correct (argmax would say token 0). Position 2: ignored:
    loss 0, unmasked, not correct."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]], dtype=F64)
    targets = torch.tensor([[0, 1, -100]])
    out = sft_token_losses(logits, targets)
    torch.testing.assert_close(
        out.losses, torch.tensor([[math.log(1 + 2 * math.exp(-2)), math.log(3.0), 0.0]], dtype=F64)
    )
    assert out.mask.tolist() == [[True, True, False]]
    assert out.correct.tolist() == [[True, True, False]]


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


def test_correct_means_the_target_has_the_largest_logit_ties_included():
    """Rows (B=1, T=5) over 4 tokens. A unique max on the target: correct. A max tied between
    tokens 0 and 2: correct for target 0 and for target 2 (argmax would credit only token 0), not
    for target 1. Ignored: not correct, even where its target slot would hold the max."""
    logits = torch.tensor(
        [[[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 5.0, 0.0], [5.0, 1.0, 5.0, 0.0], [5.0, 1.0, 5.0, 0.0], [9.0, 0, 0, 0]]]
    )
    targets = torch.tensor([[1, 0, 2, 1, -100]])
    assert sft_token_losses(logits, targets).correct.tolist() == [[True, True, True, False, False]]


def test_correct_matches_argmax_up_to_ties():
    """`correct` is "no logit in the row exceeds the target's" on supervised positions. Targets are
    the last of the row's largest logits at about half the positions, random elsewhere. float32
    logits from randn have no ties, so there `correct` is exactly argmax == target. Small integer
    logits (bf16) tie often, so the last of the maxima is mostly not the argmax (the first), and
    `correct` holds wherever argmax == target and also on those ties."""
    g = torch.Generator().manual_seed(2)
    randn = torch.randn(4, 64, 1000, generator=g) * 3
    coarse = torch.randint(0, 6, (4, 64, 50), generator=g).bfloat16()
    for logits in (randn, coarse):
        vocab = logits.shape[-1]
        argmax = logits.argmax(-1)
        last_argmax = vocab - 1 - logits.flip(-1).argmax(-1)
        coin = torch.rand(4, 64, generator=g)
        targets = torch.where(coin < 0.5, last_argmax, torch.randint(0, vocab, (4, 64), generator=g))
        targets[:, :8] = -100
        mask = targets != -100
        correct = sft_token_losses(logits, targets, chunk_size=48).correct
        by_argmax = (argmax == targets) & mask
        picked = logits.gather(-1, targets.clamp_min(0)[..., None])
        assert torch.equal(correct, (logits <= picked).all(-1) & mask)
        if logits is randn:
            assert torch.equal(correct, by_argmax) and correct.sum() > 50
        else:
            assert (correct | ~by_argmax).all() and (correct & ~by_argmax).sum() > 50


def test_float32_losses_and_gradient_match_cross_entropy_in_float64():
    """float32 logits take the fused path (no upcast): losses and their gradient equal float64
    cross_entropy of the same values to float32 rounding, at any chunk size; ignored rows get an
    exactly zero gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 20, 500, generator=g) * 4
    targets = torch.randint(0, 500, (3, 20), generator=g)
    targets[1, 5:] = -100
    x64 = logits.double().requires_grad_(True)
    ref = F.cross_entropy(x64.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    for chunk_size in (7, 4096):
        x = logits.clone().requires_grad_(True)
        out = sft_token_losses(x, targets, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad(out.losses.sum(), x)
        torch.testing.assert_close(out.losses.double(), ref.detach(), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
        assert (grad[1, 5:] == 0).all()
