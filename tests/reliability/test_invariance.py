"""The first optimizer step's loss and gradients do not depend on how its records are laid out.

8 records of very different lengths (padded), as one micro-batch of 8 (8x1), as 4 accumulated
micro-batches of 2 (2x4), as micro-batches of 3, 3 and 2 (3x3), or on 2 DDP processes with
micro-batches of 3 and 1 each: the loss of a step is its summed token (or pair) losses divided
by the tokens (pairs) of the whole step, and the stages undo Lightning's division by
accumulate_grad_batches and DDP's gradient averaging, so every layout must give the same loss
and gradients. Token counts differ per chat, so 2x4 already weighs a per-micro-batch mean
differently for SFT; for pairs (normalised per pair) only micro-batches of unequal size do,
hence 3x3. The negative controls show these layouts do tell a per-micro-batch mean apart.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from first_step import RECORDS, STAGES, TINY, chat_data, first_step, pair_data

from plpost import RewardModule, SFTModule

SCRIPT = Path(__file__).with_name("first_step.py")


def assert_same_step(actual: dict, expected: dict) -> None:
    torch.testing.assert_close(actual["loss"], expected["loss"], rtol=1e-5, atol=1e-7)
    assert actual["gradients"].keys() == expected["gradients"].keys() and expected["gradients"]
    for name, gradient in expected["gradients"].items():
        torch.testing.assert_close(actual["gradients"][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", list(STAGES))
def test_8x1_2x4_and_3x3_give_the_same_loss_and_gradients(stage):
    whole = first_step(stage, RECORDS)
    assert_same_step(first_step(stage, 2, accumulate=4), whole)
    assert_same_step(first_step(stage, 3, accumulate=3), whole)


@pytest.mark.slow
def test_two_ddp_processes_give_the_loss_and_gradients_of_one(tmp_path):
    """Every stage in one 2-process launch (each process: micro-batches of 3 and 1); one process holds 8."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), str(out), "2"], check=True, env=env, timeout=600)
    ddp = torch.load(out, weights_only=True)
    for stage in STAGES:
        assert_same_step(ddp[stage], first_step(stage, RECORDS))


def micro_batches(data) -> list:
    """The records as the data module's micro-batches, each normalised by itself alone."""
    data.setup("fit")
    collate, size = data.collate_fn(), data.batch_size
    return [collate([(e, None) for e in data.train_examples[i : i + size]]) for i in range(0, RECORDS, size)]


def test_a_per_micro_batch_mean_would_differ_on_these_layouts():
    """Negative control: a mean per micro-batch, averaged over the micro-batches, is another loss
    than the per-step one here: for SFT as 2x4 (token counts differ), for pairs as 3x3."""
    sft = SFTModule(TINY)
    sft.configure_model()
    torch.manual_seed(0)
    reward = RewardModule(TINY)
    reward.configure_model()
    with torch.no_grad():
        reward.policy.score.weight.normal_(0, 1.0)  # rewards of order 1, so pair losses differ
        tokens = [sft.token_losses(b) for b in micro_batches(chat_data(2))]
        pair_losses = [reward.pair_outputs(b).losses for b in micro_batches(pair_data(3))]
    per_token = sum(o.losses.sum() for o in tokens) / sum(o.mask.sum() for o in tokens)
    assert not torch.isclose(per_token, sum(o.losses.sum() / o.mask.sum() for o in tokens) / len(tokens), rtol=1e-3)
    per_pair = torch.cat(pair_losses).mean()
    assert not torch.isclose(per_pair, sum(losses.mean() for losses in pair_losses) / len(pair_losses), rtol=1e-3)
