"""FeedbackDataModule: unpaired feedback (one completion, desirable or not) for KTO."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from plpost.data.base import PostTrainingDataModule
from plpost.data.formats import DataValidationError, RecordChecker
from plpost.data.preference import CompletionRows, PreferenceDataModule, completion_rows
from plpost.data.preference_rows import refuse_identical, validate_feedback_row, validate_preference_row
from plpost.data.sources import SourceLike, describe


class FeedbackBatch(NamedTuple):
    """N labelled completions, and for each a completion of another prompt (for KTO's reference point).

    completions: the N rows prompt_i + completion_i. mismatched: the N rows prompt_i +
    completion_j, j the example's partner (see `FeedbackDataModule`). desirable: (N,) bool.
    example_normalizer: scalar, the examples of the whole optimizer step (all micro-batches and
    devices) when the sampler knows it, else N. example_index: (N,) the example's position in
    its split's examples (a key for cached values). record_index: (N,) the record of its source
    it comes from (the two rows of a converted pair share theirs).
    """

    completions: CompletionRows
    mismatched: CompletionRows
    desirable: Tensor
    example_normalizer: Tensor
    example_index: Tensor
    record_index: Tensor


def collate_feedback(
    items: Sequence[tuple[dict, float | None]],
    *,
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int = 1,
) -> FeedbackBatch:
    examples = [example for example, _ in items]
    window_weight = items[0][1]
    rows = partial(completion_rows, pad_token_id=pad_token_id, padding_side=padding_side,
                   pad_to_multiple_of=pad_to_multiple_of)
    prompts = [example["prompt_ids"] for example in examples]
    return FeedbackBatch(
        rows(prompts, [example["completion_ids"] for example in examples]),
        rows(prompts, [example["mismatched_ids"] for example in examples]),
        torch.tensor([example["desirable"] for example in examples], dtype=torch.bool),
        torch.tensor(float(len(examples) if window_weight is None else window_weight)),
        torch.tensor([example["example_index"] for example in examples], dtype=torch.long),
        torch.tensor([example["record_index"] for example in examples], dtype=torch.long),
    )


class FeedbackDataModule(PreferenceDataModule):
    """Unpaired feedback: a prompt, one completion, and whether it is desirable.

    Rows are ``{"prompt", "completion", "label"}`` (TRL's unpaired preference format): prompt and
    completion both strings or both message lists, label true (desirable) or false. Preference
    pairs (any row `PreferenceDataModule` reads) may stand in the same source: each gives a
    desirable row (its chosen completion) and an undesirable one (its rejected completion). Rows
    are validated and tokenized exactly as `PreferenceDataModule` does (same prompt rendering,
    max_length, max_prompt_length and overflow policy; identical_pairs for the pairs); the
    loss is normalised per example.

    Each example also gets a mismatched completion, for KTO's reference point z0 (an estimate
    of KL(policy || reference) from completions that do not answer the prompt): that of the next
    example of its split, in source order (wrapping around), with a different prompt (so the
    two halves of a converted pair never mismatch each other). Fixed per example, it
    does not depend on shuffling or batching, and its reference log-prob can be precomputed.
    Where prompt + mismatched completion is longer than max_length, the mismatched completion
    is cut to fit (it feeds the estimate only, never the loss). A split whose records all have
    the same prompt has no mismatch and is refused.

    Args: those of `PreferenceDataModule`; batch_size and eval_batch_size count examples (rows).
    """

    def preprocess(self, source: str, index: int, row: dict[str, Any]) -> list[dict]:
        if not isinstance(row, dict) or not ({"chosen", "rejected"} & row.keys()) or "completion" in row:
            feedback = validate_feedback_row(source, index, row)
            prompt_ids, tokens, truncated = self.tokenize_completions(
                source, index, feedback.prompt, {"completion": feedback.completion}, feedback.tools
            )
            return [self.example(prompt_ids, tokens["completion"], feedback.desirable, index, truncated)]
        pair = validate_preference_row(source, index, row, identical_pairs=self.identical_pairs)
        prompt_ids, tokens, truncated = self.tokenize_completions(
            source, index, pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}, pair.tools
        )
        refuse_identical(RecordChecker(source, index, row), tokens["chosen"], tokens["rejected"], self.identical_pairs,
                         "as tokens (after rendering and truncation)")
        return [self.example(prompt_ids, tokens["chosen"], True, index, truncated),
                self.example(prompt_ids, tokens["rejected"], False, index, truncated)]

    @staticmethod
    def example(prompt_ids: list[int], completion_ids: list[int], desirable: bool, record: int, truncated: bool) -> dict:
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "desirable": desirable,
                "record_index": record, "truncated": truncated}

    def examples_from(self, source: SourceLike, split: str) -> list[dict]:
        examples = PostTrainingDataModule.examples_from(self, source, split)  # pairs have no margin to check here
        prompts = [tuple(example["prompt_ids"]) for example in examples]
        count = len(examples)
        # next_other[k]: the first position after k (over the list twice, to wrap) with another prompt.
        next_other: list[int | None] = [None] * (2 * count)
        for k in reversed(range(2 * count - 1)):
            next_other[k] = k + 1 if prompts[(k + 1) % count] != prompts[k % count] else next_other[k + 1]
        if next_other[0] is None:
            raise DataValidationError(
                describe(source), None, "prompt",
                "every record has the same prompt, so there is no completion of another prompt to estimate KTO's "
                "reference point with",
            )
        for position, example in enumerate(examples):
            partner = examples[next_other[position] % count]["completion_ids"]
            example["example_index"] = position
            example["mismatched_ids"] = partner[: self.max_length - len(example["prompt_ids"])]
        return examples

    def example_weight(self, example: dict) -> float:
        return 1.0  # the loss is normalised per example, whatever the lengths

    def example_length(self, example: dict) -> int:
        return len(example["prompt_ids"]) + max(len(example["completion_ids"]), len(example["mismatched_ids"]))

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], FeedbackBatch]:
        return partial(
            collate_feedback, pad_token_id=self.tokenizer.pad_token_id, padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
