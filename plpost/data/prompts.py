"""PromptDataModule: prompts for the online stages (PPO, GRPO, distillation), with their extra columns
handed on to reward functions, and optionally a dataset completion of each (distillation's lmbda < 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import datasets
from torch import Tensor

from plpost.data.base import PostTrainingDataModule, SkipRecord
from plpost.data.collate import pad_rows
from plpost.data.formats import DataValidationError, Message, RecordChecker, as_prompt_and_completion, validate_prompt_row
from plpost.data.sources import SourceLike
from plpost.data.tokenize import Overflow, completion_after_text, conversation_mask, encode_prompt, message_fields
from plpost.data.tokenize import template_refusals_named


class PromptBatch(NamedTuple):
    """Prompts ready for generation.

    input_ids, attention_mask: (B, T), left-padded, so every prompt ends where generation begins;
    the generation prompt (e.g. ``<|assistant|>``) is already part of message prompts.
    prompts: the B raw prompts as validated (strings or message lists), for reward functions.
    columns: every other field of the rows, as python lists of B values (e.g. ``answer``).
    completion_ids, completion_mask: (B, C), right-padded, each row's dataset completion as it
        follows its prompt (end-of-turn or EOS token included); None unless the data module
        reads completions.
    Lightning moves the tensors to the device; the lists stay as they are.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompts: list[str | list[Message]]
    columns: dict[str, list[Any]]
    completion_ids: Tensor | None = None
    completion_mask: Tensor | None = None


def collate_prompts(items: Sequence[tuple[dict, float | None]], *, pad_token_id: int) -> PromptBatch:
    examples = [example for example, _ in items]
    rows = [example["input_ids"] for example in examples]
    input_ids = pad_rows(rows, pad_token_id, left=True)
    attention_mask = pad_rows([[1] * len(row) for row in rows], 0, left=True)
    columns = {key: [example["columns"][key] for example in examples] for key in examples[0]["columns"]}
    completion_ids = completion_mask = None
    if "completion_ids" in examples[0]:
        completions = [example["completion_ids"] for example in examples]
        completion_ids = pad_rows(completions, pad_token_id)
        completion_mask = pad_rows([[1] * len(row) for row in completions], 0)
    prompts = [example["prompt"] for example in examples]
    return PromptBatch(input_ids, attention_mask, prompts, columns, completion_ids, completion_mask)


class PromptDataModule(PostTrainingDataModule):
    """Prompt rows for PPO: ``{"prompt": ..., <any other columns>}``.

    The prompt is a string (tokenized as it is, with the tokenizer's special tokens) or a message
    list ending in a user or tool turn (rendered with the chat template, the row's ``tools`` if
    any, and the generation prompt). Every other column of a row (e.g. the reference ``answer`` of a verifiable task) is
    kept and handed to reward functions as a keyword argument holding one value per prompt.
    With `completions`, each row also needs a ``completion`` (a string after a string prompt, a
    list of assistant messages after a message prompt, as in `ChatDataModule`'s prompt/completion
    rows), tokenized as it follows the prompt: what `DistillationModule` trains on in the
    generation batches it does not sample (lmbda < 1). Completions are never truncated.
    Every record is validated and tokenized once, before training, and kept (see plpost.data.base).

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
        completions: read and tokenize each row's ``completion`` too (`PromptBatch.completion_ids`).
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
        completions: bool = False,
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
            max_length=max_prompt_length,
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
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        self.max_prompt_length = max_prompt_length
        self.overflow = overflow
        self.completions = completions

    def preprocess(self, source: str, index: int, row: dict[str, Any]) -> dict:
        prompt, tools = validate_prompt_row(source, index, row)
        with template_refusals_named(source, index, "prompt" if isinstance(prompt, str) else message_fields("prompt", prompt)):
            if not isinstance(prompt, str):
                self.template.check_fields_rendered(prompt, tools)
            ids = encode_prompt(self.template, prompt, tools)
        if not ids:
            raise DataValidationError(source, index, "prompt", "renders to no tokens")
        completion = self.completion_ids(source, index, row, ids, tools) if self.completions else None
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
        example = {"input_ids": ids, "prompt": prompt, "columns": columns, "truncated": truncated}
        if completion is not None:
            example["completion_ids"] = completion
        return example

    def completion_ids(self, source: str, index: int, row: dict[str, Any], prompt_ids: list[int], tools) -> list[int]:
        """The row's completion tokens as they follow `prompt_ids`: a text completion and EOS after a
        text prompt; after a message prompt, what the chat template renders after the generation prompt
        up to the last answer's end-of-turn token."""
        prompt, completion = as_prompt_and_completion(RecordChecker(source, index, row))
        if isinstance(completion, str):
            return completion_after_text(self.tokenizer, prompt, completion)
        with template_refusals_named(source, index, message_fields("completion", completion)):
            ids, supervised = conversation_mask(self.template, prompt, completion, tools)
        if ids[: len(prompt_ids)] != prompt_ids or not any(supervised[len(prompt_ids) :]):
            raise DataValidationError(source, index, "completion", "the chat template renders the prompt of the whole "
                                      "conversation otherwise than the generation prompt it samples after")
        end = len(supervised) - supervised[::-1].index(True)
        return ids[len(prompt_ids) : end]

    object_fields = ("prompt", "columns")

    def example_features(self) -> dict[str, Any]:
        features = {"input_ids": datasets.Sequence(datasets.Value("int32")), "prompt": datasets.Value("binary"),
                    "columns": datasets.Value("binary")}
        if self.completions:
            features["completion_ids"] = datasets.Sequence(datasets.Value("int32"))
        return features

    def cache_settings(self) -> dict[str, Any]:
        return {**super().cache_settings(), "overflow": self.overflow, "completions": self.completions}

    def example_weight(self, example: dict) -> float:
        return 1.0  # PPO normalises per response token at update time; prompts weigh the same here

    def example_length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], PromptBatch]:
        return partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id)
