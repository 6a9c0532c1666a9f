"""The training data position: what a resumed run skips, and what leaves the random generators alone."""

import lightning as L
import pytest
import torch
from conftest import TINY

from plpost import ChatDataModule
from plpost.data.sampler import AccumulationWindowSampler, DataPosition

WEIGHTS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
ROWS = [{"messages": [{"role": "user", "content": f"{i}"}, {"role": "assistant", "content": "1" * (i + 1)}]}
        for i in range(10)]


def sampler(rank: int = 0, replicas: int = 1) -> AccumulationWindowSampler:
    return AccumulationWindowSampler(WEIGHTS, batch_size=2, accumulate=2, num_replicas=replicas, rank=rank, seed=3)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("batches", [0, 1, 2])
def test_resuming_yields_the_rest_of_the_epoch_with_the_same_window_weights(replicas, batches):
    for rank in range(replicas):
        full = sampler(rank, replicas)
        full.set_epoch(1)
        resumed = sampler(rank, replicas)
        resumed.resume_at(DataPosition(epoch=1, batches=batches))
        assert resumed.epoch == 1
        assert list(resumed) == list(full)[2 * batches :]  # (index, window weight) pairs, in order


def test_a_finished_epoch_resumes_at_the_start_of_the_next_and_other_epochs_are_whole():
    resumed = sampler()
    resumed.resume_at(DataPosition(epoch=0, batches=resumed.batches_per_epoch))  # 11 samples: 6 batches
    assert resumed.epoch == 1
    following = sampler()
    following.set_epoch(1)
    assert list(resumed) == list(following)
    resumed.set_epoch(2)
    following.set_epoch(2)
    assert list(resumed) == list(following)


def test_position_counts_the_batches_of_each_epoch():
    position = DataPosition()
    for epoch in (0, 0, 0, 1):
        position.advance(epoch)
    assert position == DataPosition(epoch=1, batches=1)


class Seen(L.Callback):
    def __init__(self) -> None:
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.records += batch.record_index.tolist()


def test_the_data_module_counts_training_batches_only_and_every_fit_starts_afresh():
    """Validation batches are not counted; a second fit of the same data module starts at the
    beginning again (only a checkpoint restores a position)."""
    from plpost import SFTModule

    data = ChatDataModule(TINY, train=ROWS, val_size=2, batch_size=2)
    for _ in range(2):
        seen = Seen()
        trainer = L.Trainer(max_steps=3, callbacks=[seen], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                            num_sanity_val_steps=1)
        trainer.fit(SFTModule(TINY, optimizer=lambda p: torch.optim.SGD(p, lr=0.0)), data)
        assert data.state_dict() == {"train_position": {"epoch": 0, "batches": 3}}
        assert len(seen.records) == 6
    fresh = ChatDataModule(TINY, train=ROWS, val_size=2, batch_size=2)
    fresh.load_state_dict(data.state_dict())
    fresh.setup("validate")  # only `fit` starts afresh
    fresh.trainer = None
    resumed = [i for batch in fresh.train_dataloader() for i in batch.record_index.tolist()]
    everything = sorted(e["record_index"] for e in fresh.train_examples)
    assert len(resumed) == 2 and sorted(seen.records + resumed) == everything  # the rest of the epoch, once


def test_iterating_the_loaders_leaves_the_global_generators_alone():
    """A resumed run creates its iterators at other moments than the uninterrupted run; if each
    iter() drew from the global generator, every later dropout mask would shift."""
    data = ChatDataModule(TINY, train=ROWS, val_size=2, batch_size=2)
    data.setup("fit")
    state = torch.get_rng_state()
    for loader in (data.train_dataloader(), data.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)
