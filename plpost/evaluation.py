"""Measuring a policy on held-out prompts: task score, chat format, multi-turn episodes with an
environment, KL to a reference, learned reward, and the log-probability it gives a completion."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plpost.data.chat_template import ChatTemplate
from plpost.data.collate import pad_rows
from plpost.data.tokenize import chat_ids, prompt_ids
from plpost.environments import Environment, Message
from plpost.episodes import EPISODE_STATISTICS, EpisodePlayer
from plpost.generation import Prompt, decoding_config, eager_sampling, encode_prompts, generate_texts, generation_config
from plpost.rewards import RewardModel, Responses
from plpost.rollout import (decode_completions, join_responses, position_ids_from, response_forward, sample_responses,
                            sampled_completions)


class GreedyReport(NamedTuple):
    completions: list[str]
    scores: Tensor
    """(prompts,) float32, from the score function."""
    well_formed: Tensor
    """(prompts,) bool: stopped with the end-of-turn token and matched the expected answer format."""


@torch.no_grad()
def greedy_report(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    score_fn: Callable[..., Tensor],
    columns: dict[str, list[Any]],
    *,
    answer_format: str = r".+",
    max_new_tokens: int = 16,
) -> GreedyReport:
    """Greedy completions scored by `score_fn(prompts, completions, **columns)`.

    A completion is well formed when generation stopped at a stop token (EOS / end of turn)
    within max_new_tokens and its text, stripped, fully matches the `answer_format` regex.
    """
    generations = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    scores = torch.as_tensor(score_fn(list(prompts), generations.texts, **columns), dtype=torch.float32)
    shaped = torch.tensor([re.fullmatch(answer_format, text.strip()) is not None for text in generations.texts])
    return GreedyReport(generations.texts, scores, generations.stopped & shaped)


class EpisodeReport(NamedTuple):
    completions: list[str]
    """Each episode's last assistant turn, as a score function reads it."""
    conversations: list[list[Message]]
    """Each episode's messages after its prompt: the policy's turns (as parsed) and the environment's."""
    lengths: Tensor
    """(prompts,) the policy's tokens in the episode, every turn's stop token included."""
    stopped: Tensor
    """(prompts,) bool: every policy turn ended with a stop token within max_new_tokens."""
    statistics: dict[str, Tensor]
    """name -> (prompts,) float, per episode: those of `plpost.episodes.Episodes` (turns, tool_calls, ...)."""
    scores: Tensor | None
    """(prompts,) float32 from the score function (None without one)."""


@torch.no_grad()
def episode_report(
    model: PreTrainedModel,
    template: ChatTemplate | PreTrainedTokenizerBase,
    environment: Environment,
    prompts: Sequence[list[Message]],
    score_fn: Callable[..., Tensor] | None,
    columns: dict[str, list[Any]],
    *,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
) -> EpisodeReport:
    """One episode per prompt of `environment` with `model`, greedy unless `do_sample`, scored as
    training scores them: `score_fn(prompts, completions, conversation=..., **columns)`.

    template: the chat template the prompts are rendered with (a tokenizer: its own); the rows'
    `tools` column, where there is one, adds their schemas before the environment's. Every turn
    is at most `max_new_tokens`; `batch_size` prompts play at a time.
    """
    if not prompts:
        empty = {name: torch.zeros(0) for name in EPISODE_STATISTICS}
        return EpisodeReport([], [], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), empty,
                             None if score_fn is None else torch.zeros(0))
    template = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
    tokenizer = template.tokenizer
    config = decoding_config(tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             top_p=top_p)
    player = EpisodePlayer(environment, template, stop_ids=config.eos_token_id, max_new_tokens=max_new_tokens,
                           max_positions=getattr(model.config, "max_position_embeddings", None))
    device = next(model.parameters()).device

    def sample_turn(input_ids: Tensor, attention_mask: Tensor, num_samples: int) -> Tensor:
        return sampled_completions(model, input_ids, attention_mask, config, pad_token_id=tokenizer.pad_token_id,
                                   num_samples=num_samples)[0]

    completions, conversations, lengths, stopped, statistics = [], [], [], [], []
    with eager_sampling():
        for start in range(0, len(prompts), batch_size):
            part = {key: values[start : start + batch_size] for key, values in columns.items()}
            episodes = player.play(sample_turn, prompts[start : start + batch_size], part, 1, device=device)
            completions += episodes.completions
            conversations += episodes.conversations
            lengths.append(episodes.samples.response_mask.sum(1).cpu())
            stopped.append(episodes.samples.stopped.cpu())
            statistics.append({name: values.cpu() for name, values in episodes.statistics.items()})
    scores = None
    if score_fn is not None:
        scores = torch.as_tensor(score_fn(list(prompts), completions, conversation=conversations, **columns),
                                 dtype=torch.float32)
    return EpisodeReport(completions, conversations, torch.cat(lengths), torch.cat(stopped),
                         {name: torch.cat([part[name] for part in statistics]) for name in EPISODE_STATISTICS}, scores)


class SampledReport(NamedTuple):
    prompts: list[Prompt]
    """Each prompt repeated once per sample, in the order of the samples."""
    completions: list[str]
    kl: Tensor
    """(samples,) log policy(y|x) - log reference(y|x), summed over each response's tokens."""


@torch.no_grad()
def sampled_report(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 16,
    samples_per_prompt: int = 4,
    batch_size: int = 256,
    seed: int = 0,
) -> SampledReport:
    """Responses sampled from the policy at temperature 1, with their log-ratio to a reference.

    For y ~ policy(.|x), KL(policy || reference) = E[sum_t log policy(y_t|.) - log reference(y_t|.)],
    so the mean of `kl` is an unbiased estimate of it (in nats per response). The global RNG is
    seeded with `seed` for the sampling and given back as it was.
    """
    device = next(policy.parameters()).device
    config = generation_config(tokenizer, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=max_new_tokens)
    repeated = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    completions, totals = [], []
    modes = policy.training, reference.training
    try:
        for start in range(0, len(repeated), batch_size):
            input_ids, attention_mask = (t.to(device) for t in encode_prompts(tokenizer, repeated[start : start + batch_size]))
            samples = sample_responses(policy, input_ids, attention_mask, config, pad_token_id=tokenizer.pad_token_id)
            inputs = (samples.input_ids, samples.attention_mask, samples.position_ids, samples.response_mask)
            policy_logps = response_forward(policy.eval(), *inputs, temperature=1.0).logprobs
            reference_logps = response_forward(reference.eval(), *inputs, temperature=1.0).logprobs
            totals.append((policy_logps - reference_logps).sum(dim=1).cpu())
            completions += decode_completions(tokenizer, samples)
    finally:
        torch.set_rng_state(generator_state)
        policy.train(modes[0])
        reference.train(modes[1])
    return SampledReport(repeated, completions, torch.cat(totals))


@torch.no_grad()
def learned_rewards(
    reward_model_path: str, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], completions: list[str]
) -> Tensor:
    """(prompts,) scores of a trained reward model folder for these completions."""
    reward_model = RewardModel(reward_model_path)
    reward_model.setup(tokenizer)
    input_ids, attention_mask = encode_prompts(tokenizer, list(prompts))
    responses = Responses(
        prompts=list(prompts), completions=completions, columns={}, input_ids=input_ids,
        attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
        stopped=torch.ones(len(prompts), dtype=torch.bool),
    )
    # Only the prompts are tokenized here, so the reward model must re-render prompt + completion
    # from the texts with its own template.
    reward_model.shares_tokens = False
    return reward_model(responses)


@torch.no_grad()
def completion_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list], completions: Sequence[str],
    *, batch_size: int = 256,
) -> Tensor:
    """(prompts,) log model(completion | prompt): the summed log-probability of the assistant turn's
    tokens, its end-of-turn token included, as the chat template renders them after the prompt.

    prompts: message lists; the template must render each prompt (with its generation prompt)
    as a token prefix of the conversation that ends with the completion.
    """
    responses = []
    for prompt, completion in zip(prompts, completions, strict=True):
        head = prompt_ids(tokenizer, prompt)
        full = chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": completion}], add_generation_prompt=False)
        if full[: len(head)] != head:
            raise ValueError(f"the chat template does not render prompt {prompt!r} as a prefix of its answered conversation")
        responses.append(full[len(head) :])
    was_training = model.training
    model.eval()
    totals = []
    try:
        for start in range(0, len(responses), batch_size):
            input_ids, attention_mask = encode_prompts(tokenizer, prompts[start : start + batch_size])
            rows = responses[start : start + batch_size]
            response_ids = pad_rows(rows, tokenizer.pad_token_id)
            response_mask = pad_rows([[1] * len(row) for row in rows], 0).bool()
            samples = join_responses(input_ids, attention_mask, response_ids, response_mask, response_mask.any(1))
            device = next(model.parameters()).device
            inputs = [t.to(device) for t in (samples.input_ids, samples.attention_mask, samples.position_ids, response_mask)]
            totals.append(response_forward(model, *inputs, temperature=1.0).logprobs.sum(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(totals)
