"""Synthetic long-tailed chat and preference rows, made from a seed, identical for every framework.

Text is random lowercase words; with the bundled byte-level tokenizer one character is one token,
so lengths are drawn in tokens (lognormal: many short rows, a few long ones, as in real chat
data) and each row is fitted so its longest sequence is at most `max_length` tokens: nothing is
ever truncated, by any framework.

Every framework reads the same rows in the same order (no shuffling). The raw torch loop cannot
use a framework's data pipeline, so `tokenize_chat` / `tokenize_pair` tokenize with the
tokenizer's own chat template (the same calls plpost and TRL make), and the tests check that the
token ids match plpost's data modules exactly.
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from benchmarks.presets import Preset

IGNORE_INDEX = -100


def random_text(rng: random.Random, characters: int) -> str:
    """`characters` characters of lowercase words separated by single spaces."""
    words, total = [], 0
    while total < characters:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(word)
        total += len(word) + 1
    return " ".join(words)[:characters].strip() or "a"


def lognormal_length(rng: random.Random, median: int, sigma: float, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def chat_rows(preset: Preset, count: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """`count` SFT rows {"messages": [user, assistant]}, each at most preset.max_length tokens."""
    rng = random.Random(preset.seed)
    rows = []
    for _ in range(count):
        prompt_len = lognormal_length(rng, preset.prompt_median, preset.length_sigma, preset.max_length // 2)
        completion_len = lognormal_length(rng, preset.completion_median, preset.length_sigma, preset.max_length)
        prompt = random_text(rng, prompt_len)
        completion = random_text(rng, completion_len)
        overflow = len(tokenize_chat(tokenizer, chat(prompt, completion))[0]) - preset.max_length
        if overflow > 0:
            completion = completion[: len(completion) - overflow].strip() or "a"
        rows.append({"messages": chat(prompt, completion)})
    return rows


def preference_rows(preset: Preset, count: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """`count` rows {"prompt": [user], "chosen": [assistant], "rejected": [assistant]} (explicit prompt,
    message lists); prompt + either completion is at most preset.max_length tokens."""
    rng = random.Random(preset.seed + 1)
    rows = []
    for _ in range(count):
        prompt_len = lognormal_length(rng, preset.prompt_median, preset.length_sigma, preset.max_length // 2)
        prompt = [{"role": "user", "content": random_text(rng, prompt_len)}]
        row = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            completion_len = lognormal_length(rng, preset.completion_median, preset.length_sigma, preset.max_length)
            text = random_text(rng, completion_len)
            prompt_ids, completion_ids = tokenize_completion(tokenizer, prompt, [assistant(text)])
            overflow = len(prompt_ids) + len(completion_ids) - preset.max_length
            if overflow > 0:
                text = text[: len(text) - overflow].strip() or "a"
            row[side] = [assistant(text)]
        if row["chosen"] == row["rejected"]:
            row["rejected"] = [assistant(row["rejected"][0]["content"] + " b")]
        rows.append(row)
    return rows


def chat(prompt: str, completion: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, assistant(completion)]


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are the ids on assistant tokens (the template's generation spans,
    end-of-turn included) and IGNORE_INDEX elsewhere. Needs a template with generation markers."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(encoded["input_ids"])
    labels = [token if supervised else IGNORE_INDEX for token, supervised in zip(ids, encoded["assistant_masks"])]
    return ids, labels


def tokenize_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completion: list[dict]
) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids): the prompt with the generation prompt, and what the template adds after it."""
    def ids(messages: list[dict], **kwargs) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    prompt_ids = ids(prompt, add_generation_prompt=True)
    full = ids(prompt + completion)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + completion")
    return prompt_ids, full[len(prompt_ids) :]


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of a preference row."""
    prompt_ids, chosen_ids = tokenize_completion(tokenizer, row["prompt"], row["chosen"])
    _, rejected_ids = tokenize_completion(tokenizer, row["prompt"], row["rejected"])
    return prompt_ids, chosen_ids, rejected_ids


def length_grouped_row_order(preset: Preset, rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The positions of `rows` in the order plpost's PreferenceDataModule(group_by_length=
    preset.length_group_batches, shuffle=False, seed=preset.seed) reads them in its first epoch;
    the tests check that it does."""
    import torch

    from plpost.data.sampler import length_grouped_order

    lengths = [len(prompt) + max(len(chosen), len(rejected))
               for prompt, chosen, rejected in (tokenize_pair(tokenizer, row) for row in rows)]
    order = length_grouped_order(
        torch.arange(len(rows)), torch.tensor(lengths), block=preset.batch_size,
        blocks_per_group=preset.length_group_batches, generator=torch.Generator().manual_seed(preset.seed),
    )
    return order.tolist()


def rows_for(stage: str, preset: Preset, count: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    return chat_rows(preset, count, tokenizer) if stage == "sft" else preference_rows(preset, count, tokenizer)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def real_token_counts(stage: str, rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Non-pad tokens each row puts through the model: its sequence (SFT), or prompt + chosen plus
    prompt + rejected (a pair is two sequences)."""
    if stage == "sft":
        return [len(tokenize_chat(tokenizer, row["messages"])[0]) for row in rows]
    counts = []
    for row in rows:
        prompt_ids, chosen_ids, rejected_ids = tokenize_pair(tokenizer, row)
        counts.append(2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids))
    return counts
