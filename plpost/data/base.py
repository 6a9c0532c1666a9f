"""What every plpost DataModule shares: sources, validation, tokenization counts and loaders.

Tokenized data is kept (see plpost.data.prepared): `prepare_data`, which Lightning runs in one
process per machine, validates and tokenizes every record into a cache entry once, in `num_proc`
processes; `setup`, on every rank, memory-maps it. A later run with the same source, tokenizer and
settings reads the entry instead of tokenizing again.

Resuming mid-epoch: the data module counts the training batches handed to training steps
(`on_before_batch_transfer`), saves that position in checkpoints (`state_dict`), and builds the
next training loader to start right after it, without loading what it skips. The data module
holds the position, not the DataLoader, because Lightning restores data-module state before it
asks for any loader: the sampler is built already in the right epoch and place, whenever
Lightning then creates the iterator (a stateful DataLoader relies on Lightning restoring it
before that, which has not always held: Lightning issue #20550).

Over 300 lines: one Lightning lifecycle (prepare, set up, load, resume), in the order Lightning
calls it; the parts that stand alone are their own modules (`prepared`, `table`, `sampler`,
`streaming`, `cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from plpost.data.cache import cache_root, entry_key, tokenizer_identity
from plpost.data.chat_template import ChatTemplate
from plpost.data.prepared import KEPT, SkipRecord, prepared_entry
from plpost.data.sampler import (
    AccumulationWindowSampler,
    DataPosition,
    ResumableDataLoader,
    WeightedExamples,
    check_group_by_length,
)
from plpost.data.source_tables import encoded
from plpost.data.sources import DataSource, SourceLike, source_fingerprint
from plpost.data.streaming import StreamedExamples, check_streamable, streamed
from plpost.data.table import ExampleTable
from plpost.hf import load_tokenizer

log = logging.getLogger(__name__)

__all__ = ["PostTrainingDataModule", "SkipRecord"]  # SkipRecord: what a subclass raises


class PostTrainingDataModule(L.LightningDataModule):
    """Validates and tokenizes every record once, before the first training step, into a cache entry
    that every rank memory-maps.

    Subclasses define `preprocess` (one raw row -> one example dict, a list of them, or SkipRecord; a
    pure function of the row, as it runs in worker processes), `example_features` (the Arrow types of
    an example's fields), `example_weight` (what the loss is normalised by), `example_length` (the
    tokens it occupies in a padded batch), `collate_fn`, and `cache_settings` (every argument that
    changes what `preprocess` returns).
    """

    object_fields: tuple[str, ...] = ()
    """Example fields kept as written (as JSON text), not as Arrow types: values of any shape."""
    weight_feature: Any = datasets.Value("float64")
    example_table_type: type[ExampleTable] = ExampleTable

    def __init__(
        self,
        tokenizer: str,
        train: SourceLike | None = None,
        val: SourceLike | None = None,
        *,
        val_size: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 1024,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        group_by_length: int | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_group_by_length(group_by_length)
        if num_proc is not None and (isinstance(num_proc, bool) or num_proc < 1):
            raise ValueError(f"num_proc must be a number of processes >= 1 (or None: one per core), got {num_proc!r}")
        if train is None and val is None:
            raise ValueError("give at least one of `train` and `val`")
        self.tokenizer_name = tokenizer
        self.train_source, self.val_source = train, val
        self.val_size = val_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.chat_template = chat_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.trust_remote_code = trust_remote_code
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._template: ChatTemplate | None = None
        self._entries: dict[str, Path] = {}
        self.train_examples: ExampleTable | None = None
        self.val_examples: ExampleTable | None = None
        self.counts: dict[str, dict[str, int]] = {}
        self.train_position = DataPosition()
        self._train_sampler: AccumulationWindowSampler | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.tokenizer_name, chat_template=self.chat_template, trust_remote_code=self.trust_remote_code
            )
        return self._tokenizer

    @property
    def template(self) -> ChatTemplate:
        """The tokenizer's chat template with `chat_template_kwargs`, as every record is rendered."""
        if self._template is None:
            self._template = ChatTemplate(self.tokenizer, self.chat_template_kwargs)
        return self._template

    def __getstate__(self) -> dict[str, Any]:
        # What worker processes that preprocess (and spawned DataLoader workers) receive: not the trainer.
        return {**self.__dict__, "trainer": None, "_train_sampler": None}

    def preprocess(self, source: str, index: int, row: dict[str, Any]) -> dict | list[dict]:
        raise NotImplementedError

    def example_features(self) -> dict[str, Any]:
        """The `datasets` feature of each field `preprocess` returns (object_fields: datasets.Value("binary"))."""
        raise NotImplementedError

    def cache_settings(self) -> dict[str, Any]:
        """Every argument that changes what `preprocess` returns: part of the cache entry's key."""
        return {"max_length": self.max_length, "chat_template_kwargs": self.chat_template_kwargs}

    def finish_split(self, source: str, table: pa.Table, kept_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Checks over a whole split and per-example arrays to keep with it (by example); none by default."""
        return {}

    def table_features(self) -> datasets.Features:
        bookkeeping = {
            "_outcome": datasets.Value("string"), "_truncated": datasets.Value("bool"),
            "_weight": self.weight_feature, "_length": datasets.Value("int64"),
        }
        return datasets.Features({**self.example_features(), **bookkeeping})

    def stored(self, example: dict) -> dict:
        """An example as its table row holds it: object fields as JSON text."""
        return {key: encoded(value) if key in self.object_fields else value
                for key, value in example.items()}

    def example_weight(self, example: dict) -> float:
        raise NotImplementedError

    def example_length(self, example: dict) -> int:
        raise NotImplementedError

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], Any]:
        """A picklable function (no reference to this module or its trainer) for worker processes."""
        raise NotImplementedError

    def sources(self) -> dict[str, SourceLike]:
        return {split: source for split, source in (("train", self.train_source), ("val", self.val_source))
                if source is not None}

    def prepare_data(self) -> None:
        """Tokenizes the sources into the cache, unless already there (Lightning: once per machine)."""
        for split in self.sources():
            if streamed(self.sources()[split]) is None:
                self.entry(split)

    @property
    def train_examples(self) -> ExampleTable | None:
        if self.streamed_train is not None:
            raise ValueError(
                f"the training set {self.streamed_train.path} is streamed, so it is never held whole: what needs every "
                "example before training (precomputed reference log-probs, val_size) needs `streaming: false`"
            )
        return self._train_examples

    @train_examples.setter
    def train_examples(self, examples: ExampleTable | None) -> None:
        self._train_examples = examples

    @property
    def streamed_train(self) -> DataSource | None:
        """The training source, if it is streamed (see plpost.data.streaming)."""
        return streamed(self.train_source)

    @cached_property
    def tokenizer_identity(self) -> dict[str, Any]:
        return tokenizer_identity(self.tokenizer)

    def entry_folder(self, split: str) -> Path:
        """Where the cache entry of a split's source is kept: named by the key of everything it depends on."""
        settings = {
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
            "source": source_fingerprint(self.sources()[split]),
            "tokenizer": self.tokenizer_identity,
            "settings": self.cache_settings(),
        }
        return cache_root(self.cache_dir) / f"{type(self).__name__}-{entry_key(settings)}"

    def entry(self, split: str) -> Path:
        """The cache entry of a split's source, built by this process unless another has built it."""
        if split not in self._entries:
            self._entries[split] = prepared_entry(
                self, self.sources()[split], self.entry_folder(split), num_proc=self.num_proc
            )
        return self._entries[split]

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            # Every fit starts at the beginning; resuming from a checkpoint restores the position
            # afterwards (Lightning calls `load_state_dict` after `setup`).
            self.train_position = DataPosition()
        if self._train_examples is not None or self.val_examples is not None:
            return
        check_streamable(self)
        examples = {split: self.examples_from(split) for split, source in self.sources().items() if streamed(source) is None}
        train, val = examples.get("train"), examples.get("val")
        if self.val_size and train is not None:
            if val is not None:
                raise ValueError("give either `val` or `val_size`, not both")
            if not 0 < self.val_size < len(train):
                raise ValueError(f"val_size={self.val_size} must be between 1 and {len(train) - 1}")
            train, val = held_out(train, self.val_size, self.seed)
        self.train_examples, self.val_examples = train, val
        self.log_counts()

    def examples_from(self, split: str) -> ExampleTable:
        examples = self.example_table_type(self.entry(split))
        self.counts[split] = examples.manifest["counts"]
        return examples

    def log_counts(self) -> None:
        for split, counts in self.counts.items():
            changed = {k: v for k, v in counts.items() if k not in ("records", KEPT)}
            message = f"{split}: {counts[KEPT]} of {counts['records']} records kept"
            if changed:
                message += " (" + ", ".join(f"{v} {k}" for k, v in sorted(changed.items())) + ")"
            (log.warning if changed else log.info)(message)
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:
            logger.log_metrics(
                {f"data/{split}/{key}": value for split, counts in self.counts.items() for key, value in counts.items()},
                step=0,
            )

    def train_dataloader(self) -> DataLoader:
        """Starts where `train_position` says training got to (the start, unless resumed)."""
        if self.streamed_train is not None:
            return self.streamed_train_dataloader()
        if self.train_examples is None:
            raise RuntimeError("no training data: give `train` and call setup('fit')")
        trainer = self.trainer
        sampler = self._train_sampler = AccumulationWindowSampler(
            self.train_examples.column("weights"),
            batch_size=self.batch_size,
            accumulate=trainer.accumulate_grad_batches if trainer is not None else 1,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            shuffle=self.shuffle,
            seed=self.seed,
            lengths=self.train_examples.column("lengths") if self.group_by_length else None,
            group_by_length=self.group_by_length,
        )
        sampler.resume_at(self.train_position)
        return ResumableDataLoader(
            WeightedExamples(self.train_examples),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self.loader_generator(),
        )

    def streamed_train_dataloader(self) -> DataLoader:
        """This rank's part of the streamed training set, after the batches already trained on."""
        trainer = self.trainer
        if trainer is not None and trainer.max_steps in (None, -1):
            raise ValueError("a streamed training set has no length, so its epochs cannot end training: set max_steps")
        examples = StreamedExamples(
            self, self.streamed_train, rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1, shuffle=self.shuffle, seed=self.seed,
            skip=self.train_position.batches * self.batch_size,
        )
        return DataLoader(examples, batch_size=self.batch_size, collate_fn=self.collate_fn())

    def val_dataloader(self) -> DataLoader:
        if not self.val_examples:
            return []
        return DataLoader(
            WeightedExamples(self.val_examples),
            batch_size=self.eval_batch_size,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
            generator=self.loader_generator(),
        )

    def loader_generator(self) -> torch.Generator:
        # A DataLoader without its own generator draws its workers' base seed from the global
        # generator at every iter(); a resumed run creates its iterators at other moments than
        # the uninterrupted one, so that draw would shift every later dropout mask.
        return torch.Generator().manual_seed(self.seed)

    # -- resuming -------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once per batch that a training step is about to use (not for prefetched ones).
        if self.trainer is not None and self.trainer.training:
            if self._train_sampler is not None:
                self.train_position.advance(self._train_sampler.epoch)
            elif self.streamed_train is not None:
                self.train_position.advance(0)  # a stream's passes are one epoch without end
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"train_position": {"epoch": self.train_position.epoch, "batches": self.train_position.batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_position = DataPosition(**state_dict.get("train_position", {}))


def held_out(examples: ExampleTable, size: int, seed: int) -> tuple[ExampleTable, ExampleTable]:
    """(the rest, a seeded random sample of `size` examples), each in source order: a validation set drawn
    from the whole split, not from its first records (a file sorted by source would give one source)."""
    sample = np.sort(np.random.default_rng(seed).choice(len(examples), size=size, replace=False))
    rest = np.setdiff1d(np.arange(len(examples)), sample, assume_unique=True)
    return examples.select(rest), examples.select(sample)


def trainer_template(trainer: L.Trainer | None, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """The chat template a run renders its conversations with: its plpost data module's (with that
    module's `chat_template_kwargs`), else the tokenizer's own."""
    data = trainer.datamodule if trainer is not None else None
    return data.template if isinstance(data, PostTrainingDataModule) else ChatTemplate(tokenizer)
