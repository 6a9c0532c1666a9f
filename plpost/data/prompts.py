"""PromptDataModule: prompts for PPO, with their extra columns handed on to reward functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

from torch import Tensor

from plpost.data.base import PostTrainingDataModule, SkipRecord
from plpost.data.collate import pad_rows
from plpost.data.formats import DataValidationError, Message, validate_prompt_row
from plpost.data.sources import SourceLike
from plpost.data.tokenize import Overflow, encode_prompt, message_fields, template_refusals_named


class PromptBatch(NamedTuple):
    """Prompts ready for generation.

    input_ids, attention_mask: (B, T), left-padded, so every prompt ends where generation begins;
    the generation prompt (e.g. ``<|assistant|>``) is already part of message prompts.
    prompts: the B raw prompts as validated (strings or message lists), for reward functions.
    columns: every other field of the rows, as python lists of B values (e.g. ``answer``).
    Lightning moves the tensors to the device; the lists stay as they are.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompts: list[str | list[Message]]
    columns: dict[str, list[Any]]


def collate_prompts(items: Sequence[tuple[dict, float | None]], *, pad_token_id: int) -> PromptBatch:
    examples = [example for example, _ in items]
    rows = [example["input_ids"] for example in examples]
    input_ids = pad_rows(rows, pad_token_id, left=True)
    attention_mask = pad_rows([[1] * len(row) for row in rows], 0, left=True)
    columns = {key: [example["columns"][key] for example in examples] for key in examples[0]["columns"]}
    return PromptBatch(input_ids, attention_mask, [example["prompt"] for example in examples], columns)


class PromptDataModule(PostTrainingDataModule):
    """Prompt rows for PPO: ``{"prompt": ..., <any other columns>}``.

    The prompt is a string (tokenized as it is, with the tokenizer's special tokens) or a message
    list ending in a user or tool turn (rendered with the chat template, the row's ``tools`` if
    any, and the generation prompt). Every other column of a row (e.g. the reference ``answer`` of a verifiable task) is
    kept and handed to reward functions as a keyword argument holding one value per prompt.
    Every record is validated and tokenized in `setup`, before training.

    Args:
        tokenizer: Hub name, local folder or bundled name (``plpost:tiny``) of the policy's tokenizer.
        train: training rows: a file, a bundled file, a Hub dataset name, a `DataSource`, or a
            list of row dicts.
        val: held-out prompt rows, same forms as `train` (PPOModule has no validation step: score
            held-out prompts with the `plpost.callbacks.GenerationEval` callback instead).
        val_size: hold out this many training records for validation instead of `val`.
        batch_size: prompts per rollout on each device (one training step generates for them all).
        eval_batch_size: prompts per validation batch (default: batch_size).
        max_prompt_length: the longest prompt in tokens (the response budget is the module's
            `max_new_tokens`).
        overflow: what happens to a longer prompt: "truncate" keeps its LAST max_prompt_length
            tokens (the end of a prompt, where the question and the generation prompt are,
            matters most; a leading BOS is lost with the rest), "drop" skips it, "error" stops
            with an error naming it. Truncated and dropped prompts are counted and logged.
        num_workers: DataLoader worker processes.
        shuffle: reshuffle the training prompts every epoch.
        seed: seed of the shuffle.
        group_by_length: sort the training prompts by length within groups of this many micro-batches
            (of all devices together) and shuffle the batches within each group: less padding,
            while each group still draws from the whole shuffled epoch. Hugging Face's
            LengthGroupedSampler uses groups of 50; None keeps the shuffled order.
        chat_template: a Jinja template (string or .jinja file) replacing the tokenizer's.
        chat_template_kwargs: variables every rendering of the template gets, e.g.
            ``{enable_thinking: false}`` (Qwen3) or ``{date_string: "26 Jul 2024"}`` (Llama 3.x,
            whose templates otherwise render today's date into the system header).
        trust_remote_code: allow a tokenizer that runs code from its repository.
    """

    def __init__(
        self,
        tokenizer: str,
        train: SourceLike | None = None,
        val: SourceLike | None = None,
        *,
        val_size: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        max_prompt_length: int = 512,
        overflow: Overflow = "truncate",
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        group_by_length: int | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(
            tokenizer,
            train,
            val,
            val_size=val_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_length=max_prompt_length,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            group_by_length=group_by_length,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
            trust_remote_code=trust_remote_code,
        )
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        self.max_prompt_length = max_prompt_length
        self.overflow = overflow

    def preprocess(self, source: str, index: int, row: dict[str, Any]) -> dict:
        prompt, tools = validate_prompt_row(source, index, row)
        with template_refusals_named(source, index, "prompt" if isinstance(prompt, str) else message_fields("prompt", prompt)):
            if not isinstance(prompt, str):
                self.template.check_fields_rendered(prompt, tools)
            ids = encode_prompt(self.template, prompt, tools)
        if not ids:
            raise DataValidationError(source, index, "prompt", "renders to no tokens")
        truncated = len(ids) > self.max_prompt_length
        if truncated:
            if self.overflow == "error":
                raise DataValidationError(
                    source, index, "prompt", f"{len(ids)} tokens exceed max_prompt_length={self.max_prompt_length}"
                )
            if self.overflow == "drop":
                raise SkipRecord("dropped (longer than max_prompt_length)")
            ids = ids[-self.max_prompt_length :]
        columns = {key: value for key, value in row.items() if key != "prompt"}
        return {"input_ids": ids, "prompt": prompt, "columns": columns, "truncated": truncated}

    def example_weight(self, example: dict) -> float:
        return 1.0  # PPO normalises per response token at update time; prompts weigh the same here

    def example_length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], PromptBatch]:
        return partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id)
