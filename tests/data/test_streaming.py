"""Streamed training sets (`streaming: true`): each rank's part, passes without end, the per-micro-batch
normaliser, exact resume, and refusals of what a stream cannot give (see plpost.data.streaming)."""

from __future__ import annotations

import itertools
import json

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from plpost import ChatDataModule, PreferenceDataModule, SFTModule
from plpost.data import DataSource, DataValidationError
from plpost.data.streaming import StreamedExamples
from plpost.data.tokenize import IGNORE_INDEX
from conftest import TINY, bundled_pairs

RECORDS = 30


def chats_file(tmp_path, count: int = RECORDS, bad: int | None = None) -> str:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"{i}+{i}"},
                                      {"role": "assistant", "content": "4" * (i % 7 + 1)}]}) for i in range(count)]
    if bad is not None:
        lines[bad] = lines[bad].replace("assistant", "asistant")
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def streamed(path: str, **options) -> ChatDataModule:
    data = ChatDataModule(TINY, train={"path": path, "streaming": True}, batch_size=4, cache_dir="unused", **options)
    data.prepare_data()
    data.setup("fit")
    return data


def records(loader, batches: int) -> list[list[int]]:
    stream = iter(loader)
    return [next(stream).record_index.tolist() for _ in range(batches)]


def test_a_streamed_set_is_read_in_seeded_passes_without_end_and_never_cached(tmp_path):
    """30 records in batches of 4: 15 batches hold two passes. Each pass holds every record once, in
    another shuffled order; batch 7 holds the end of the first pass and the start of the second (no
    epoch boundary), and the same seed gives the same order."""
    data = streamed(chats_file(tmp_path))
    flat = [record for batch in records(data.train_dataloader(), 15) for record in batch]
    first, second = flat[:RECORDS], flat[RECORDS:]
    assert sorted(first) == sorted(second) == list(range(RECORDS)) and first != second
    assert flat == [r for batch in records(streamed(chats_file(tmp_path)).train_dataloader(), 15) for r in batch]
    assert not (tmp_path / "unused").exists() and not list(tmp_path.glob("*.arrow"))


def test_a_parquet_file_streams_as_its_json_lines_twin_does(tmp_path):
    """The same chats as Parquet (typed by its schema) and as JSON Lines: the same batches."""
    path = chats_file(tmp_path)
    rows = [json.loads(line) for line in open(path)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    from_parquet = records(streamed(str(tmp_path / "chats.parquet")).train_dataloader(), 8)
    assert from_parquet == records(streamed(path).train_dataloader(), 8)


def test_each_rank_reads_its_own_part(tmp_path):
    """Two ranks of one file: one record in two each (a one-shard stream is split by records), together
    all of them, in each rank's first pass."""
    data = streamed(chats_file(tmp_path), shuffle=False)
    parts = [[example["record_index"] for example, _ in itertools.islice(
        StreamedExamples(data, data.streamed_train, rank=rank, world_size=2, shuffle=False, seed=0), RECORDS // 2)]
        for rank in (0, 1)]
    assert parts == [list(range(0, RECORDS, 2)), list(range(1, RECORDS, 2))]


def test_a_streamed_batch_is_normalised_by_its_own_loss_tokens(tmp_path):
    """Without the whole set the sampler cannot sum an optimizer step's tokens ahead: each micro-batch's
    normaliser is the count of its own predicted supervised labels (a row's first token is never predicted)."""
    stream = iter(streamed(chats_file(tmp_path)).train_dataloader())
    for _ in range(8):
        batch = next(stream)
        assert batch.loss_normalizer.item() == (batch.labels[:, 1:] != IGNORE_INDEX).sum().item()


def test_resuming_after_some_batches_continues_with_the_next_batch_exactly(tmp_path):
    """A loader built at position 9 (batches trained on, past the first pass's end at 7.5) yields what the
    uninterrupted loader yields from its tenth batch on, tensors equal."""
    path = chats_file(tmp_path)
    uninterrupted = iter(streamed(path).train_dataloader())
    expected = [next(uninterrupted) for _ in range(13)][9:]
    resumed = streamed(path)
    resumed.load_state_dict({"train_position": {"epoch": 0, "batches": 9}})
    stream = iter(resumed.train_dataloader())
    for batch in expected:
        assert all(torch.equal(a, b) for a, b in zip(batch, next(stream)) if isinstance(a, torch.Tensor))


@pytest.mark.slow
def test_a_streamed_run_resumed_from_its_checkpoint_trains_as_the_uninterrupted_run(tmp_path):
    """SFT on the tiny model, 6 optimizer steps of 2 micro-batches, against 3 steps, a checkpoint, and 3
    more from it: the same records in the same micro-batches, and bit-equal weights."""
    path = chats_file(tmp_path)

    class Seen(L.Callback):
        def __init__(self):
            self.records = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.records.append(batch.record_index.tolist())

    def fit(steps: int, folder: str, resume: bool = False):
        L.seed_everything(0, verbose=False)
        module, seen = SFTModule(TINY), Seen()
        trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=str(tmp_path / folder), callbacks=[seen])
        data = ChatDataModule(TINY, train=DataSource(path, streaming=True), batch_size=2)
        last = tmp_path / "part" / "last.ckpt"
        trainer.fit(module, data, ckpt_path=str(last) if resume else None)
        if not resume and folder == "part":
            trainer.save_checkpoint(last)
        return module.state_dict(), seen.records

    whole, whole_seen = fit(6, "whole")
    _, first_seen = fit(3, "part")
    resumed, second_seen = fit(6, "part", resume=True)
    assert first_seen + second_seen == whole_seen
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_a_bad_streamed_record_stops_training_when_it_is_reached_naming_it(tmp_path):
    stream = iter(streamed(chats_file(tmp_path, bad=6), shuffle=False).train_dataloader())
    next(stream)  # records 0-3
    with pytest.raises(DataValidationError, match=r'chats.jsonl, record 6, field "messages\[1\].role"'):
        next(stream)


@pytest.mark.parametrize(("options", "refused"), [
    ({"val_size": 3}, "val_size=3 holds out a random sample of the whole set"),
    ({"group_by_length": 8}, "group_by_length=8 sorts by the lengths of the whole set"),
    ({"num_workers": 2}, "num_workers=2 starts loader processes, and each would read the whole stream"),
])
def test_what_needs_the_whole_set_is_refused_for_a_streamed_one(tmp_path, options, refused):
    with pytest.raises(ValueError, match=refused):
        streamed(chats_file(tmp_path), **options)


def test_a_stage_that_needs_every_example_before_training_is_refused_clearly(tmp_path):
    """Precomputed reference log-probs read `train_examples`; a stream never holds them."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(row) for row in bundled_pairs(8)) + "\n")
    data = PreferenceDataModule(TINY, train=DataSource(str(pairs), streaming=True), batch_size=2)
    data.setup("fit")
    with pytest.raises(ValueError, match="is streamed, so it is never held whole"):
        data.train_examples  # noqa: B018


def test_a_stream_needs_max_steps_and_a_whole_validation_set(tmp_path):
    path = chats_file(tmp_path)
    data = streamed(path)
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match="has no length, so its epochs cannot end training: set max_steps"):
        data.train_dataloader()
    with pytest.raises(ValueError, match="a validation set is read whole"):
        ChatDataModule(TINY, train=path, val=DataSource(path, streaming=True)).setup("fit")
