"""What every plpost DataModule shares: sources, validation, tokenization counts and loaders.

Resuming mid-epoch: the data module counts the training batches handed to training steps
(`on_before_batch_transfer`), saves that position in checkpoints (`state_dict`), and builds the
next training loader to start right after it, without loading what it skips. The data module
holds the position, not the DataLoader, because Lightning restores data-module state before it
asks for any loader: the sampler is built already in the right epoch and place, whenever
Lightning then creates the iterator (a stateful DataLoader relies on Lightning restoring it
before that, which has not always held: Lightning issue #20550).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from plpost.data.chat_template import ChatTemplate
from plpost.data.formats import DataValidationError
from plpost.data.sampler import (
    AccumulationWindowSampler,
    DataPosition,
    ResumableDataLoader,
    WeightedExamples,
    check_group_by_length,
)
from plpost.data.sources import SourceLike, describe, load_source
from plpost.hf import load_tokenizer

log = logging.getLogger(__name__)

KEPT = "kept"


class SkipRecord(Exception):
    """Raised by `preprocess` for a record that the stated policy skips; its reason is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PostTrainingDataModule(L.LightningDataModule):
    """Loads, validates and tokenizes every record in `setup`, before the first training step.

    Subclasses define `preprocess` (one raw row -> one example dict, a list of them, or SkipRecord),
    `example_weight` (what the loss is normalised by), `example_length` (the tokens it occupies in
    a padded batch) and `collate_fn`.
    """

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
    ) -> None:
        super().__init__()
        check_group_by_length(group_by_length)
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
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._template: ChatTemplate | None = None
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None
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

    def preprocess(self, source: str, index: int, row: dict[str, Any]) -> dict | list[dict]:
        raise NotImplementedError

    def example_weight(self, example: dict) -> float:
        raise NotImplementedError

    def example_length(self, example: dict) -> int:
        raise NotImplementedError

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], Any]:
        """A picklable function (no reference to this module or its trainer) for worker processes."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        for source in (self.train_source, self.val_source):
            if source is not None:
                load_source(source)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            # Every fit starts at the beginning; resuming from a checkpoint restores the position
            # afterwards (Lightning calls `load_state_dict` after `setup`).
            self.train_position = DataPosition()
        if self.train_examples is not None or self.val_examples is not None:
            return
        train = self.examples_from(self.train_source, "train") if self.train_source is not None else None
        val = self.examples_from(self.val_source, "val") if self.val_source is not None else None
        if self.val_size and train is not None:
            if val is not None:
                raise ValueError("give either `val` or `val_size`, not both")
            if not 0 < self.val_size < len(train):
                raise ValueError(f"val_size={self.val_size} must be between 1 and {len(train) - 1}")
            train, val = train[self.val_size :], train[: self.val_size]
        self.train_examples, self.val_examples = train, val
        self.log_counts()

    def examples_from(self, source: SourceLike, split: str) -> list[dict]:
        name = describe(source)
        dataset = load_source(source)
        examples, outcomes = [], Counter()
        for index, row in enumerate(dataset):
            try:
                produced = self.preprocess(name, index, row)
            except SkipRecord as skip:
                outcomes[skip.reason] += 1
                continue
            produced = produced if isinstance(produced, list) else [produced]
            outcomes[KEPT] += 1
            if any([example.pop("truncated", False) for example in produced]):  # a list: every flag is popped
                outcomes["truncated"] += 1
            examples.extend(produced)
        if not examples:
            # Every record cut to nothing or dropped by max_length: the limit is below the prompts.
            too_short = all("max_length" in reason or "truncation" in reason for reason in outcomes)
            fix = f"; raise max_length (now {self.max_length}) above the prompts' length" if too_short else ""
            raise DataValidationError(name, None, None, f"no record is usable ({dict(outcomes)}){fix}")
        self.counts[split] = {"records": len(dataset), **outcomes}
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
        if self.train_examples is None:
            raise RuntimeError("no training data: give `train` and call setup('fit')")
        trainer = self.trainer
        sampler = self._train_sampler = AccumulationWindowSampler(
            [self.example_weight(e) for e in self.train_examples],
            batch_size=self.batch_size,
            accumulate=trainer.accumulate_grad_batches if trainer is not None else 1,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            shuffle=self.shuffle,
            seed=self.seed,
            lengths=[self.example_length(e) for e in self.train_examples] if self.group_by_length else None,
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
        if self.trainer is not None and self.trainer.training and self._train_sampler is not None:
            self.train_position.advance(self._train_sampler.epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"train_position": {"epoch": self.train_position.epoch, "batches": self.train_position.batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_position = DataPosition(**state_dict.get("train_position", {}))
