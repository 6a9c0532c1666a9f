"""Prompt encoding and text generation shared by callbacks and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from plpost.data.collate import pad_rows
from plpost.data.tokenize import Prompt, end_of_turn_ids, prompt_ids
from plpost.sampling import complete


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), left-padded so every prompt ends where generation begins."""
    rows = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    input_ids = pad_rows(rows, tokenizer.pad_token_id, left=True)
    attention_mask = pad_rows([[1] * len(row) for row in rows], 0, left=True)
    return input_ids, attention_mask


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return sorted(end_of_turn_ids(tokenizer))


def generation_config(tokenizer: PreTrainedTokenizerBase, **settings) -> GenerationConfig:
    """A GenerationConfig that stops at EOS or end-of-turn and pads with the tokenizer's pad token."""
    return GenerationConfig(eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **settings)


def decoding_config(tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int, do_sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0) -> GenerationConfig:
    """Greedy decoding, or sampling at `temperature` within `top_p` (no top-k cut), with the KV cache."""
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True)
    if do_sample:
        settings.update(temperature=temperature, top_p=top_p, top_k=0)
    return generation_config(tokenizer, **settings)


class Generations(NamedTuple):
    texts: list[str]
    """Completions, special tokens removed."""
    lengths: Tensor
    """(prompts,) completion tokens, the stop token included."""
    stopped: Tensor
    """(prompts,) bool: the completion ended with a stop token within max_new_tokens."""


def completion_stats(completion_ids: Tensor, stop_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Lengths up to and including the first stop token, and whether there was one.

    completion_ids: (batch, time), the generated tokens only (generate pads after a stop).
    """
    is_stop = torch.isin(completion_ids, torch.as_tensor(list(stop_ids), device=completion_ids.device))
    stopped = is_stop.any(dim=1)
    first_stop = torch.where(stopped, is_stop.int().argmax(dim=1), completion_ids.shape[1] - 1)
    return first_stop + 1, stopped


@torch.no_grad()
def eager_sampling():
    """A context in which compiled forwards (`torch_compile`) run eagerly: plpost samples eagerly.
    KV-cache decoding through a compiled forward compiles several more graphs (empty cache, first
    decode step, dynamic cache strides) for a small gain; see `PPOModule.compiled_modules`."""
    return torch.compiler.set_stance("force_eager")


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    backend: str | None = None,
) -> Generations:
    """Completions for `prompts` from the sampler (`plpost.sampling.complete`, `backend` as there),
    greedy unless `do_sample`; leaves the model in the mode it found it."""
    was_training = model.training
    model.eval()
    config = decoding_config(tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             top_p=top_p)
    device = next(model.parameters()).device
    texts, lengths, stopped = [], [], []
    try:
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = encode_prompts(tokenizer, prompts[start : start + batch_size])
            with eager_sampling():
                completion_ids = complete(model, input_ids.to(device), attention_mask.to(device), config,
                                          backend=backend)
            texts += tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            batch_lengths, batch_stopped = completion_stats(completion_ids, config.eos_token_id)
            lengths.append(batch_lengths.cpu())
            stopped.append(batch_stopped.cpu())
    finally:
        model.train(was_training)
    if not prompts:
        return Generations([], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    return Generations(texts, torch.cat(lengths), torch.cat(stopped))
