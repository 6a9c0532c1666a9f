"""Throughput in the progress bar (real tokens/s, episodes/s) and the per-stage bar of a pipeline."""

import itertools

import lightning as L
import torch
from conftest import TINY

from plpost import ChatDataModule, PPOModule, PromptDataModule, SFTModule
from plpost.callbacks import StageProgressBar, Throughput
from plpost.callbacks.progress import real_tokens
from plpost.data.collate import collate_chat
from plpost.rewards import RewardFunction

ROWS = [{"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": "7" * (i + 1)}]}
        for i in range(6)]


def digit_reward(prompts, completions, **columns):
    return torch.tensor([float(c.strip().isdigit()) for c in completions])


class OneSecondPerCall:
    """A clock that advances one second each time it is read."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def __call__(self) -> float:
        return float(next(self.ticks))


def test_real_tokens_count_the_mask_or_every_packed_token():
    """Two rows of 3 and 5 real tokens padded to 5: 8 real tokens; packed into one row: all 8."""
    examples = [({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, 2.0), ({"input_ids": [5, 6, 7, 8, 9], "labels": [-100] * 4 + [9]}, 1.0)]
    assert int(real_tokens(collate_chat(examples, pad_token_id=0, packing=False))) == 8
    packed = collate_chat(examples, pad_token_id=0, packing=True)
    assert packed.attention_mask is None and int(real_tokens(packed)) == 8
    assert real_tokens(("not", "a", "batch")) is None


def fit(module, data, callbacks, **trainer):
    L.seed_everything(0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks,
                        num_sanity_val_steps=0, **trainer)
    trainer.fit(module, data)
    return trainer


def test_tokens_per_second_over_the_window():
    """With one second per batch, the rate after batch k over a window of 2 batches is the real
    tokens of batches k-1 and k divided by 2 s (over k s while fewer batches have passed)."""
    data = ChatDataModule(TINY, train=ROWS, batch_size=2, max_length=64, shuffle=False)
    data.setup("fit")
    batches = [int(real_tokens(collate_chat([(e, 1.0) for e in data.train_examples[i:i + 2]], pad_token_id=0)))
               for i in range(0, 6, 2)]
    throughput = Throughput(window=2)
    throughput._clock = OneSecondPerCall()
    trainer = fit(SFTModule(TINY), data, [throughput], max_steps=3, enable_progress_bar=False)
    expected = (batches[1] + batches[2]) / 2
    assert trainer.progress_bar_metrics["tok/s"] == round(expected)
    torch.testing.assert_close(trainer.callback_metrics["perf/tokens_per_s"], torch.tensor(expected))


def test_a_stage_that_counts_episodes_shows_episodes_per_second():
    """PPO counts 4 episodes per rollout of 4 prompts; one second per rollout: 4.0 episodes/s."""
    throughput = Throughput()
    throughput._clock = OneSecondPerCall()
    ppo = PPOModule(TINY, rewards=[RewardFunction(digit_reward)], max_new_tokens=3, ppo_epochs=1)
    data = PromptDataModule(TINY, train="plpost:data/addition/prompts.jsonl", batch_size=4)
    trainer = fit(ppo, data, [throughput], limit_train_batches=2, max_epochs=1, enable_progress_bar=False)
    assert trainer.progress_bar_metrics["ep/s"] == 4.0 and "tok/s" not in trainer.progress_bar_metrics


def test_stages_add_a_throughput_unless_one_is_given():
    data = ChatDataModule(TINY, train=ROWS, batch_size=2, max_length=64)
    trainer = fit(SFTModule(TINY), data, [], max_steps=1, enable_progress_bar=False)
    assert sum(isinstance(c, Throughput) for c in trainer.callbacks) == 1
    mine = Throughput(window=3)
    trainer = fit(SFTModule(TINY), data, [mine], max_steps=1, enable_progress_bar=False)
    assert [c for c in trainer.callbacks if isinstance(c, Throughput)] == [mine]


def test_stage_bar_spans_every_epoch():
    """2 epochs of 3 batches: one bar of 6, labelled with the stage."""
    bar = StageProgressBar("[1/4] SFT")
    data = ChatDataModule(TINY, train=ROWS, batch_size=2, max_length=64)
    fit(SFTModule(TINY), data, [bar], max_epochs=2)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (6, 6)
    assert bar.train_progress_bar.desc.startswith("[1/4] SFT")


def test_stage_bar_total_follows_max_steps_whatever_the_steps_per_batch():
    """PPO takes ppo_epochs = 2 optimizer steps per rollout; max_steps=6 ends after 3 of the 10 rollouts."""
    bar = StageProgressBar("[4/4] PPO")
    ppo = PPOModule(TINY, rewards=[RewardFunction(digit_reward)], max_new_tokens=3, ppo_epochs=2)
    data = PromptDataModule(TINY, train="plpost:data/addition/prompts.jsonl", batch_size=4)
    fit(ppo, data, [bar], max_steps=6, limit_train_batches=10, max_epochs=1)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
