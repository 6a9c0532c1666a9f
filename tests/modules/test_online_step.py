"""The one online training step PPO, GRPO and distillation share (`plpost.modules.online`): one
micro-batch rule, the layout the old log-probs and the first pass share, and gradients that do not
depend on how the rows are split, for every online stage."""

from functools import partial

import lightning as L
import pytest
import torch
from conftest import TINY, GradientCapture

from plpost.data.prompts import PromptDataModule
from plpost.modules import DistillationModule, GRPOModule, ModelSettings, PPOModule
from plpost.modules.online import forward_in_layout, micro_batch_layout, per_token
from plpost.rewards import RewardFunction

ROWS = [{"prompt": [{"role": "user", "content": q}]} for q in ["1+1", "12+34", "5+5", "99+9", "20+22"]]


def text_value(prompts, completions, **columns):
    """Differs between any two different completions, so groups almost never have equal rewards."""
    return torch.tensor([sum(ord(ch) for ch in c) / 1000.0 for c in completions])


def test_rows_split_into_steps_then_micro_batches_differing_by_at_most_one():
    """7 rows, 2 optimizer steps of 2 micro-batches: torch.tensor_split gives steps of 4 and 3 rows,
    then micro-batches of 2 + 2 and 2 + 1, consecutive."""
    layout = micro_batch_layout(torch.arange(7), 2, 2)
    assert [[rows.tolist() for rows in step] for step in layout] == [[[0, 1], [2, 3]], [[4, 5], [6]]]
    shuffled = torch.tensor([3, 0, 2, 1])
    assert [[rows.tolist() for rows in step] for step in micro_batch_layout(shuffled, 1, 3)] == [[[3, 0], [2], [1]]]
    with pytest.raises(ValueError, match="3 rows cannot fill num_mini_batches \\* gradient_accumulation_steps = 4"):
        micro_batch_layout(torch.arange(3), 2, 2)


def test_forward_in_layout_runs_each_micro_batch_once_in_order():
    calls = []

    def doubled(values, others):
        calls.append(values.tolist())
        return values * 2, others + 1

    layout = micro_batch_layout(torch.arange(5), 2, 1)
    doubled_values, shifted = forward_in_layout(doubled, [torch.arange(5), torch.zeros(5)], layout)
    assert calls == [[0, 1, 2], [3, 4]] and doubled_values.tolist() == [0, 2, 4, 6, 8]
    assert shifted.tolist() == [1.0] * 5


def test_per_token_divides_by_the_tokens_and_never_by_zero():
    sums = {"tokens": torch.tensor(4.0), "loss": torch.tensor(2.0)}
    assert per_token(sums) == {"loss": torch.tensor(0.5)}
    assert per_token({"tokens": torch.tensor(0.0), "loss": torch.tensor(0.0)}) == {"loss": torch.tensor(0.0)}


STAGES = {
    # PPO used to refuse a rollout its micro-batches did not divide; 5 rows now split 2 + 2 + 1.
    "ppo": lambda accumulation: PPOModule(
        TINY, rewards=[RewardFunction(text_value)], max_new_tokens=4, ppo_epochs=1, gradient_clip_val=None,
        gradient_accumulation_steps=accumulation, optimizer=partial(torch.optim.SGD, lr=0.1)),
    "grpo": lambda accumulation: GRPOModule(
        TINY, rewards=[RewardFunction(text_value)], num_generations=4, max_new_tokens=4, gradient_clip_val=None,
        gradient_accumulation_steps=accumulation, optimizer=partial(torch.optim.SGD, lr=0.1)),
    "distillation": lambda accumulation: DistillationModule(
        TINY, TINY, max_new_tokens=4, gradient_clip_val=None, gradient_accumulation_steps=accumulation,
        model_settings=ModelSettings(random_init=True),
        optimizer=partial(torch.optim.SGD, lr=0.1)),
}


@pytest.mark.parametrize("stage", STAGES)
def test_every_online_stage_gives_the_same_gradients_however_the_rows_are_split(stage):
    """5 prompts as one micro-batch or as 3 accumulated ones (sizes 2, 2, 1, or 7, 7, 6 for GRPO's
    20 completions): the same samples (drawn before the split), so the same first-step gradients."""
    gradients = []
    for accumulation in (1, 3):
        L.seed_everything(0)
        capture = GradientCapture()
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[capture])
        trainer.fit(STAGES[stage](accumulation), PromptDataModule(TINY, ROWS, batch_size=5))
        gradients.append(capture.gradients)
    whole, split = gradients
    assert whole and whole.keys() == split.keys() and any(g.abs().sum() > 0 for g in whole.values())
    for name, gradient in whole.items():
        torch.testing.assert_close(split[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
