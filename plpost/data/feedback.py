"""FeedbackDataModule: unpaired feedback (one completion, desirable or not) for KTO."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from plpost.data.formats import DataValidationError, RecordChecker
from plpost.data.preference import CompletionRows, PreferenceDataModule, completion_rows
from plpost.data.preference_rows import refuse_identical, validate_feedback_row, validate_preference_row
from plpost.data.table import READ_CHUNK, ExampleTable


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


def list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Per row (a skipped record's placeholder: 0); computed chunk by chunk, never a copy of the column."""
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


class FeedbackExamples(ExampleTable):
    """Feedback examples, each with its position in the split and its partner's (mismatched) completion."""

    def finish(self, position: int, row: dict[str, Any]) -> dict[str, Any]:
        row = super().finish(position, row)
        partner_row = int(self.kept_rows[self.arrays["partner"][position]])
        partner = self.table["completion_ids"][partner_row].as_py()
        row["example_index"] = position
        row["mismatched_ids"] = partner[: self.manifest["settings"]["max_length"] - len(row["prompt_ids"])]
        return row


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

    weight_feature = datasets.Value("float64")
    example_table_type = FeedbackExamples

    def example_features(self) -> dict[str, Any]:
        tokens = datasets.Sequence(datasets.Value("int32"))
        return {"prompt_ids": tokens, "completion_ids": tokens, "desirable": datasets.Value("bool"),
                "record_index": datasets.Value("int64")}

    def finish_split(self, source: str, table: pa.Table, kept_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each example's partner (the example whose completion is its mismatched one) and its padded length
        with that mismatched completion (pairs have no margin to check here)."""
        count, column = len(kept_rows), table["prompt_ids"]

        def prompts_at(positions: np.ndarray) -> list[list[int]]:  # positions ascending: one slice of the table
            rows = kept_rows[positions]
            piece = column.slice(int(rows[0]), int(rows[-1] - rows[0]) + 1).to_pylist()
            return [piece[row - rows[0]] for row in rows]

        # differs[k]: example k's prompt is not that of the next example (wrapping around).
        differs = np.zeros(count, dtype=bool)
        previous = None
        for start in range(0, count, READ_CHUNK):
            prompts = prompts_at(np.arange(start, min(start + READ_CHUNK, count)))
            if previous is not None:
                differs[start - 1] = prompts[0] != previous
            for offset in range(len(prompts) - 1):
                differs[start + offset] = prompts[offset] != prompts[offset + 1]
            previous = prompts[-1]
        differs[count - 1] = previous != prompts_at(np.zeros(1, dtype=np.int64))[0]
        # next_other[k]: the first position after k (over the examples twice, to wrap) with another prompt.
        next_other = np.full(2 * count, -1, dtype=np.int64)
        for k in reversed(range(2 * count - 1)):
            next_other[k] = k + 1 if differs[k % count] else next_other[k + 1]
        if next_other[0] == -1:
            raise DataValidationError(
                source, None, "prompt",
                "every record has the same prompt, so there is no completion of another prompt to estimate KTO's "
                "reference point with",
            )
        partner = next_other[:count] % count
        prompt_lengths = list_lengths(table["prompt_ids"])[kept_rows]
        completion_lengths = list_lengths(table["completion_ids"])[kept_rows]
        mismatched = np.clip(np.minimum(completion_lengths[partner], self.max_length - prompt_lengths), 0, None)
        return {"partner": partner, "lengths": prompt_lengths + np.maximum(completion_lengths, mismatched)}

    def example_weight(self, example: dict) -> float:
        return 1.0  # the loss is normalised per example, whatever the lengths

    def example_length(self, example: dict) -> int:
        # Before the split is complete, the mismatched completion is unknown; `finish_split` adds it.
        return len(example["prompt_ids"]) + max(len(example["completion_ids"]), len(example.get("mismatched_ids", ())))

    def collate_fn(self) -> Callable[[Sequence[tuple[dict, float | None]]], FeedbackBatch]:
        return partial(
            collate_feedback, pad_token_id=self.tokenizer.pad_token_id, padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
