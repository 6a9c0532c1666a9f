"""PreferenceDataModule: (prompt, chosen, rejected) pairs for reward modelling and DPO.

Over 300 lines: one data module, its validation of a pair's three parts, their tokenization and
its batch; the row formats it reads are in `plpost.data.preference_rows`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from plpost.data.base import PostTrainingDataModule, SkipRecord
from plpost.data.collate import pad_rows
from plpost.data.formats import DataValidationError, Message, RecordChecker
from plpost.data.preference_rows import IdenticalPairs, refuse_identical, validate_preference_row
from plpost.data.sources import SourceLike
from plpost.data.tokenize import (
    IGNORE_INDEX, Overflow, completion_after_text, encode_prompt, message_fields, template_refusals_named,
)

class PreferenceBatch(NamedTuple):
    """N preference pairs as 2N sequences, so both completions go through the model in one forward.

    input_ids, attention_mask, labels, position_ids: (2N, T), the N chosen rows then the N
    rejected rows (row i and row N + i are one pair). labels hold the completion tokens (its
    end-of-turn token included) and IGNORE_INDEX on prompt and padding; they are aligned with
    input_ids (shift them for next-token targets).
    pair_normalizer: scalar, the pairs of the whole optimizer step (all micro-batches and
    devices) when the sampler knows it, else N.
    margin: (N,) from the optional `margin` column, else None.
    pair_index: (N,) the record index of each pair in its source (a key for cached values).
    chosen_token_normalizer: scalar, the predicted chosen-completion tokens of the same step
    (else of this batch), for an NLL term averaged per token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    position_ids: Tensor
    pair_normalizer: Tensor
    margin: Tensor | None
    pair_index: Tensor
    chosen_token_normalizer: Tensor


class CompletionRows(NamedTuple):
    """Prompt + completion rows, padded: input_ids, attention_mask, labels (completion tokens,
    IGNORE_INDEX elsewhere) and position_ids, all (rows, T)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    position_ids: Tensor


def completion_rows(
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    *,
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int = 1,
) -> CompletionRows:
    """One padded row per (prompt, completion) token lists; labels mark the completion."""
    sequences = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    labels = [[IGNORE_INDEX] * len(prompt) + completion for prompt, completion in zip(prompts, completions)]
    pad = partial(pad_rows, left=padding_side == "left", multiple_of=pad_to_multiple_of)
    attention_mask = pad([[1] * len(sequence) for sequence in sequences], 0)
    # Counted from the first real token, so a left-padded row sees the positions it has unpadded.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return CompletionRows(pad(sequences, pad_token_id), attention_mask, pad(labels, IGNORE_INDEX), position_ids)


def predicted_tokens(prompt_ids: list[int], completion_ids: list[int]) -> int:
    """The completion tokens a forward predicts: all but the first when nothing precedes it."""
    return len(completion_ids) - (0 if prompt_ids else 1)


def collate_preference(
    items: Sequence[tuple[dict, list[float] | None]],
    *,
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int = 1,
) -> PreferenceBatch:
    examples = [example for example, _ in items]
    window_weight = items[0][1]
    if window_weight is None:
        window_weight = [len(examples), sum(predicted_tokens(e["prompt_ids"], e["chosen_ids"]) for e in examples)]
    pair_normalizer, chosen_token_normalizer = (torch.tensor(float(weight)) for weight in window_weight)
    rows = completion_rows(
        [example["prompt_ids"] for example in examples] * 2,
        [example["chosen_ids"] for example in examples] + [example["rejected_ids"] for example in examples],
        pad_token_id=pad_token_id, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
    )
    has_margin = examples[0]["margin"] is not None  # all or none: checked per split in `examples_from`
    margin = torch.tensor([example["margin"] for example in examples]) if has_margin else None
    pair_index = torch.tensor([example["pair_index"] for example in examples], dtype=torch.long)
    return PreferenceBatch(*rows, pair_normalizer, margin, pair_index, chosen_token_normalizer)


class PreferenceDataModule(PostTrainingDataModule):
    """Preference pairs: a prompt, a chosen and a rejected completion, and an optional margin.

    Rows are ``{"prompt", "chosen", "rejected"}`` or ``{"chosen", "rejected"}`` whole
    conversations sharing a prefix (see `validate_preference_row`), strings or message lists,
    with an optional numeric ``margin`` (given for every record of a split or for none).
    Message-list pairs are rendered by the chat template as prompt + chosen and prompt +
    rejected; each completion runs from its first generated token (after the role header) to its
    end-of-turn token, and the tokens before it, the same in both renderings, are the prompt.
    String prompts are tokenized as text and each completion after them, followed by EOS. The
    loss is normalised per pair.

    Args:
        tokenizer: Hub name, local folder or bundled name (``plpost:tiny``) of the tokenizer;
            its chat template renders the conversations.
        train: training rows: a file, a bundled file, a Hub dataset name, a `DataSource`, or a
            list of row dicts.
        val: validation rows, same forms as `train`.
        val_size: hold out this many training records for validation instead of `val`.
        batch_size: pairs per micro-batch (each batch holds 2 * batch_size sequences).
        eval_batch_size: pairs per validation batch (default: batch_size).
        max_length: the longest sequence (prompt + one completion) in tokens.
        max_prompt_length: keep only the last this-many tokens of a longer prompt (its end,
            which the completion answers); counted as truncated. None: prompts are not cut.
        overflow: what happens to a pair with a sequence longer than max_length: "truncate"
            keeps its first max_length tokens (cutting the completion's end), "drop" skips the
            pair, "error" stops with an error naming it. Truncated and dropped pairs are counted
            and logged; a pair whose completion loses every token is always skipped and counted.
        identical_pairs: a pair whose chosen and rejected are the same: "error" stops with an
            error naming it, "skip" skips it and counts it.
        padding_side: where batches are padded; the models read each row's last real token
            from the attention mask, so both sides give the same results.
        pad_to_multiple_of: round padded lengths up (e.g. 8 for tensor cores).
        num_workers: DataLoader worker processes.
        shuffle: reshuffle the training pairs every epoch.
        seed: seed of the shuffle.
        group_by_length: sort the training pairs by length within groups of this many micro-batches
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
        max_prompt_length: int | None = None,
        overflow: Overflow = "truncate",
        identical_pairs: IdenticalPairs = "error",
        padding_side: Literal["right", "left"] = "right",
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
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 1 (or None: prompts are not cut)")
        self.max_prompt_length = max_prompt_length
        self.overflow = overflow
        self.identical_pairs = identical_pairs
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def preprocess(self, source: str, index: int, row: dict[str, Any]) -> dict:
        pair = validate_preference_row(source, index, row, identical_pairs=self.identical_pairs)
        prompt_ids, completions, truncated = self.tokenize_completions(
            source, index, pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}, pair.tools
        )
        refuse_identical(
            RecordChecker(source, index, row), completions["chosen"], completions["rejected"], self.identical_pairs,
            "as tokens (after rendering and truncation)",
        )
        return {
            "prompt_ids": prompt_ids, "chosen_ids": completions["chosen"], "rejected_ids": completions["rejected"],
            "margin": pair.margin, "pair_index": index, "truncated": truncated,
        }

    def tokenize_completions(
        self, source: str, index: int, prompt: list[Message] | str, completions: dict[str, list[Message] | str],
        tools: list | None,
    ) -> tuple[list[int], dict[str, list[int]], bool]:
        """(prompt tokens, field -> completion tokens, whether anything was cut) of one record's prompt
        and its completions (all text or all messages), with max_prompt_length and the overflow
        policy applied. Every completion must follow the same prompt tokens."""
        if isinstance(prompt, str):
            prompt_ids = encode_prompt(self.template, prompt)  # as generation sees it
            tokens = {name: completion_after_text(self.tokenizer, prompt, text) for name, text in completions.items()}
        else:
            tokens, first = {}, next(iter(completions))
            for name, completion in completions.items():
                rendered_prompt, tokens[name] = self.split_rendering(prompt, completion, tools, source, index, name)
                if name == first:
                    prompt_ids = rendered_prompt
                elif rendered_prompt != prompt_ids:
                    raise DataValidationError(
                        source, index, name,
                        f"the chat template renders the prompt differently before {name} than before {first}, so the "
                        "pair has no shared prompt to compare the completions on",
                    )
        truncated = self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length
        if truncated:
            prompt_ids = prompt_ids[-self.max_prompt_length :]
        for name, completion in tokens.items():
            length = len(prompt_ids) + len(completion)
            if length <= self.max_length:
                continue
            if self.overflow == "error":
                raise DataValidationError(
                    source, index, name, f"prompt + {name} is {length} tokens, more than max_length={self.max_length}"
                )
            if self.overflow == "drop":
                raise SkipRecord("dropped (longer than max_length)")
            tokens[name], truncated = completion[: max(0, self.max_length - len(prompt_ids))], True
            if not tokens[name]:
                raise SkipRecord("skipped (a completion has no token left after truncation)")
        return prompt_ids, tokens, truncated

    def split_rendering(
        self, prompt: list[Message], completion: list[Message], tools: list | None, source: str, index: int, field: str,
    ) -> tuple[list[int], list[int]]:
        """(prompt tokens, completion tokens) of one rendering of prompt + completion: the completion runs
        from its first assistant turn's first generated token to its last turn's end-of-turn token."""
        messages = prompt + completion
        with template_refusals_named(source, index, message_fields("prompt", prompt) + message_fields(field, completion)):
            rendered = self.template.locate(messages, first=len(prompt), tools=tools)
        if not rendered.turn_spans:
            raise DataValidationError(source, index, field, "has no supervised assistant turn")
        start, end = rendered.turn_spans[0].start, rendered.turn_spans[-1].end
        return rendered.input_ids[:start], rendered.input_ids[start:end]

    weight_feature = datasets.Sequence(datasets.Value("float64"))

    def example_features(self) -> dict[str, Any]:
        tokens = datasets.Sequence(datasets.Value("int32"))
        return {"prompt_ids": tokens, "chosen_ids": tokens, "rejected_ids": tokens,
                "margin": datasets.Value("float64"), "pair_index": datasets.Value("int64")}

    def cache_settings(self) -> dict[str, Any]:
        return {**super().cache_settings(), "max_prompt_length": self.max_prompt_length, "overflow": self.overflow,
                "identical_pairs": self.identical_pairs}

    def finish_split(self, source: str, table: pa.Table, kept_rows: np.ndarray) -> dict[str, np.ndarray]:
        without = table["margin"].take(kept_rows).is_null().to_numpy(zero_copy_only=False)
        if without.any() and not without.all():
            first = table["pair_index"][int(kept_rows[np.argmax(without)])].as_py()
            raise DataValidationError(
                source, first, "margin",
                "is missing, but other records of this split have one (give it for every record or for none)",
            )
        return {}

    def example_weight(self, example: dict) -> tuple[float, float]:
        # Losses are normalised per pair, whatever the lengths; an NLL term may be per chosen token.
        return 1.0, float(predicted_tokens(example["prompt_ids"], example["chosen_ids"]))

    def example_length(self, example: dict) -> int:
        return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], PreferenceBatch]:
        return partial(
            collate_preference, pad_token_id=self.tokenizer.pad_token_id, padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
