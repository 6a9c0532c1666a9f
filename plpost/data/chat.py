"""ChatDataModule: conversations or prompt/completion rows for supervised fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import datasets

from plpost.data.base import PostTrainingDataModule, SkipRecord
from plpost.data.collate import ChatBatch, collate_chat, count_loss_tokens
from plpost.data.formats import validate_chat_row
from plpost.data.sources import SourceLike
from plpost.data.tokenize import Overflow, Overflowed, message_fields, template_refusals_named, tokenize_supervised


class ChatDataModule(PostTrainingDataModule):
    """Chat data for SFT: the loss falls on assistant tokens only, end-of-turn token included.

    Rows are ``{"messages": [{"role", "content"}, ...]}`` (every assistant turn is supervised,
    except those with ``weight: 0``), ``{"prompt", "completion"}`` (both strings, or both message
    lists; only the completion is supervised), or ``{"text"}`` (language modelling: every token
    and EOS). A row may carry ``tools`` (JSON schemas) for the template to render. Every record
    is validated and tokenized once, before training, and kept (see plpost.data.base).

    Args:
        tokenizer: Hub name, local folder or bundled name (``plpost:tiny``) of the tokenizer;
            its chat template renders the conversations.
        train: training rows: a file, a bundled file, a Hub dataset name, a `DataSource`, or a
            list of row dicts.
        val: validation rows, same forms as `train`.
        val_size: hold out this many training records for validation instead of `val`.
        batch_size: sequences per micro-batch.
        eval_batch_size: sequences per validation batch (default: batch_size).
        max_length: the longest sequence in tokens.
        overflow: what happens to a record longer than max_length: "truncate" keeps its first
            max_length tokens, "drop" skips it, "error" stops with an error naming it. Truncated
            and dropped records are counted and logged; a record left with no supervised token
            is always skipped and counted, so it never reaches the loss.
        packing: put each micro-batch into one row with no padding; position ids restart at
            each sequence and attention never crosses sequences.
        pad_to_multiple_of: round padded lengths up (e.g. 8 for tensor cores).
        num_workers: DataLoader worker processes.
        shuffle: reshuffle the training records every epoch.
        seed: seed of the shuffle.
        group_by_length: sort the training records by length within groups of this many micro-batches
            (of all devices together) and shuffle the batches within each group: less padding,
            while each group still draws from the whole shuffled epoch. Hugging Face's
            LengthGroupedSampler uses groups of 50; None keeps the shuffled order.
        chat_template: a Jinja template (string or .jinja file) replacing the tokenizer's.
        chat_template_kwargs: variables every rendering of the template gets, e.g.
            ``{enable_thinking: false}`` (Qwen3) or ``{date_string: "26 Jul 2024"}`` (Llama 3.x,
            whose templates otherwise render today's date into the system header).
        trust_remote_code: allow a tokenizer that runs code from its repository.
        num_proc: processes that tokenize the records, once (None: one per core, fewer for small sets).
        cache_dir: where tokenized records are kept (None: $PLPOST_DATA_CACHE, else ~/.cache/plpost/data).
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
        overflow: Overflow = "truncate",
        packing: bool = False,
        pad_to_multiple_of: int = 1,
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
        super().__init__(
            tokenizer,
            train,
            val,
            val_size=val_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_length=max_length,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            group_by_length=group_by_length,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
            trust_remote_code=trust_remote_code,
            num_proc=num_proc,
            cache_dir=cache_dir,
        )
        self.overflow = overflow
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    def preprocess(self, source: str, index: int, row: dict[str, Any]) -> dict:
        context, supervised, tools = validate_chat_row(source, index, row)
        if isinstance(supervised, str):
            fields = "text" if context is None else "completion"
        elif context:
            fields = message_fields("prompt", context) + message_fields("completion", supervised)
        else:
            fields = message_fields("messages", supervised)
        try:
            with template_refusals_named(source, index, fields):
                example = tokenize_supervised(
                    self.template, context, supervised, max_length=self.max_length, overflow=self.overflow,
                    source=source, index=index, tools=tools,
                )
        except Overflowed:
            raise SkipRecord("dropped (longer than max_length)") from None
        if count_loss_tokens(example.labels) == 0:
            raise SkipRecord("skipped (no supervised token left after truncation)")
        return {
            "input_ids": example.input_ids, "labels": example.labels, "record_index": index,
            "truncated": example.truncated,
        }

    def example_features(self) -> dict[str, Any]:
        tokens = datasets.Sequence(datasets.Value("int32"))
        return {"input_ids": tokens, "labels": tokens, "record_index": datasets.Value("int64")}

    def cache_settings(self) -> dict[str, Any]:
        return {**super().cache_settings(), "overflow": self.overflow}

    def example_weight(self, example: dict) -> float:
        return count_loss_tokens(example["labels"])

    def example_length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], ChatBatch]:
        return partial(
            collate_chat, pad_token_id=self.tokenizer.pad_token_id, packing=self.packing,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
