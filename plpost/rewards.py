"""Reward sources for the online stages (PPO, GRPO): Python functions, trained reward models,
verifiable rewards (`plpost.verifiable`), and their weighted sum.

A reward source scores B (prompt, completion) pairs with one number each, or NaN for "not
applicable" (a reward function that returns None). `RewardScorer` combines several into the score
the stage optimises:

    score = sum_i weight_i * source_i  - missing_eos_penalty * (no stop token)
            (sources that are NaN for a completion are left out of its sum; NaN if all are)
    score = (score - running mean) / running std          (if normalize)
    score = clip(score, -clip, clip)                       (if clip)

`plpost.losses.per_token_rewards` then turns a score into PPO's per-token rewards, with the KL penalty.

Sources are `torch.nn.Module`s so that a reward model moves to the device with the PPO module;
their weights are frozen and never written into checkpoints (the running statistics are).

Over 300 lines: every kind of source (functions, reward models, an environment's rewards) and the
scorer that sums them are one module, the one configs name (``plpost.rewards.RewardModel``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from plpost.data.collate import pad_rows
from plpost.data.formats import Message
from plpost.data.tokenize import chat_ids, text_mask
from plpost.episodes import Episodes
from plpost.frozen import FrozenCopy
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.reward_head import sequence_rewards
from plpost.running_moments import RunningMoments
from plpost.rollout import Samples, decode_completions, position_ids_from


class Responses(NamedTuple):
    """B sampled responses, in text and in the policy's tokens, for reward sources to score.

    prompts: the raw prompts (strings or message lists); completions: the response texts
    (special tokens removed); columns: the prompt rows' other fields, B values each.
    input_ids, attention_mask, position_ids: (B, T) the policy's prompt + response tokens
    (left-padded prompt, response padded after its stop token); stopped: (B,) bool;
    completion_lengths: (B,) the response tokens up to and including the stop token (None where
    only texts are scored, as in `plpost.evaluation`); the policy's tokens in an episode.
    conversations: in multi-turn episodes (`plpost.episodes`), each one's messages after its
        prompt (completions are then the last assistant turns' texts); else None.
    environment_rewards: (B,) the environment's reward of each episode (NaN: none), or None.
    """

    prompts: list[str | list[Message]]
    completions: list[str]
    columns: dict[str, list[Any]]
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    stopped: Tensor
    completion_lengths: Tensor | None = None
    conversations: list[list[Message]] | None = None
    environment_rewards: Tensor | None = None


def responses_of(
    tokenizer: PreTrainedTokenizerBase,
    samples: Samples,
    prompts: Sequence[str | list[Message]],
    columns: dict[str, list[Any]],
    num_samples: int = 1,
) -> Responses:
    """The `Responses` of B * num_samples sampled rows whose prompts are the B `prompts`, each
    sampled `num_samples` times in consecutive rows (prompts and columns are repeated to match)."""
    def repeat(values: Sequence[Any]) -> list[Any]:
        return [value for value in values for _ in range(num_samples)]

    return Responses(
        repeat(prompts), decode_completions(tokenizer, samples), {key: repeat(v) for key, v in columns.items()},
        samples.input_ids, samples.attention_mask, samples.position_ids, samples.stopped,
        samples.response_mask.sum(1),
    )


def responses_of_episodes(episodes: Episodes, prompts: Sequence[list[Message]], columns: dict[str, list[Any]],
                          num_samples: int = 1) -> Responses:
    """`responses_of` for multi-turn episodes: completions are the last assistant turns, and each
    episode's conversation is also a column, ``conversation``, for reward functions."""
    def repeat(values: Sequence[Any]) -> list[Any]:
        return [value for value in values for _ in range(num_samples)]

    samples = episodes.samples
    columns = {**{key: repeat(v) for key, v in columns.items()}, "conversation": episodes.conversations}
    return Responses(
        repeat(prompts), episodes.completions, columns, samples.input_ids, samples.attention_mask,
        samples.position_ids, samples.stopped, samples.response_mask.sum(1), episodes.conversations,
        episodes.environment_rewards,
    )


class RewardSource(nn.Module):
    """One reward: `forward(responses)` returns (B,) float32 scores, NaN where it does not apply.

    Args:
        weight: its weight in the sum of sources.
        name: how it is logged (``rewards/<name>``); default: derived from what it wraps.
    """

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.name = name

    def setup(self, policy_tokenizer: PreTrainedTokenizerBase) -> None:
        """Loads what the source needs (called from the PPO module's `configure_model`)."""

    def source(self) -> str:
        """Where it comes from, recorded in checkpoints."""
        return self.name or type(self).__name__

    def forward(self, responses: Responses) -> Tensor:
        raise NotImplementedError


class RewardFunction(RewardSource):
    """Any Python callable ``fn(prompts, completions, **columns) -> Tensor | list[float | None]`` of shape (B,).

    None (or NaN) means "not applicable" for that completion (e.g. a math reward on a coding
    prompt): GRPO leaves it out of its group's statistics; PPO refuses it.

    In YAML, `fn` is an import path, e.g. ``plpost.tasks.addition.exact_match_reward``. The
    columns are the prompt rows' other fields (e.g. ``answer``), one value per prompt.

    Args:
        fn: the reward function.
        weight: its weight in the sum of sources.
        name: how it is logged (default: the function's name).
    """

    def __init__(self, fn: Callable[..., Tensor], weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name or getattr(fn, "__name__", type(fn).__name__))
        self.fn = fn

    def source(self) -> str:
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', self.name)}"

    def forward(self, responses: Responses) -> Tensor:
        scores = self.fn(responses.prompts, responses.completions, **responses.columns)
        if not isinstance(scores, Tensor):
            scores = [float("nan") if score is None else score for score in scores]
        scores = torch.as_tensor(scores, dtype=torch.float32).to(responses.input_ids.device)
        expected = (len(responses.completions),)
        if scores.shape != expected:
            raise ValueError(f"reward function {self.source()} returned shape {tuple(scores.shape)}, expected {expected}")
        return scores


class EnvironmentReward(RewardSource):
    """The sum of the rewards an environment gave in each episode (`plpost.environments.Reply.reward`;
    0 where it gave none: an episode cut short is never answered), for a stage with an environment."""

    def __init__(self, weight: float = 1.0, name: str = "environment") -> None:
        super().__init__(weight, name)

    def forward(self, responses: Responses) -> Tensor:
        if responses.environment_rewards is None:
            raise ValueError("EnvironmentReward scores episodes an environment played; these responses are not")
        return responses.environment_rewards.float()


class RewardModel(RewardSource):
    """A trained reward model folder (`RewardModule`'s export: an AutoModelForSequenceClassification
    with one output), read at the last real token of prompt + response.

    When its tokenizer has the policy's vocabulary, it scores the policy's own tokens (no decoding).
    Otherwise each pair is decoded and re-tokenized with its tokenizer: message prompts through its
    chat template with the completion as the assistant turn (a multi-turn episode's whole
    conversation after the prompt), string prompts as prompt + completion
    + EOS (as the preference data was); the LAST max_length tokens are kept, since the score is
    read at the end. Re-rendering closes every turn, so a response cut at max_new_tokens looks
    finished to it: use `missing_eos_penalty` for those.

    Args:
        path: the export folder (or Hub name) of the reward model, with its tokenizer.
        weight: its weight in the sum of sources.
        name: how it is logged (default: the folder's name).
        batch_size: rows per forward (default: the whole rollout batch at once).
        max_length: the longest re-tokenized sequence (unused when the tokens are shared).
        dtype: load the weights in this dtype (default: as stored).
        trust_remote_code: allow model code from the model's repository.
    """

    def __init__(
        self,
        path: str,
        weight: float = 1.0,
        name: str | None = None,
        *,
        batch_size: int | None = None,
        max_length: int = 2048,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(weight, name or path.rstrip("/").rsplit("/", 1)[-1])
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.model: FrozenCopy | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.shares_tokens = False

    def source(self) -> str:
        return self.path

    def setup(self, policy_tokenizer: PreTrainedTokenizerBase) -> None:
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
        model = load_causal_lm(
            self.path, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code,
            auto_class=AutoModelForSequenceClassification,
        )
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward model {self.path} has {model.config.num_labels} outputs, but a reward is one number: give a "
                "RewardModule export (one output), or score with this classifier in a RewardFunction"
            )
        self.model = FrozenCopy(model, self.path)
        self.shares_tokens = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()

    @torch.no_grad()
    def forward(self, responses: Responses) -> Tensor:
        if self.model is None:
            raise RuntimeError(f"reward model {self.path} is not loaded: call setup() first")
        if self.shares_tokens:
            tensors = [responses.input_ids, responses.attention_mask, responses.position_ids]
        else:
            tensors = self.retokenize(responses)
        rows = tensors[0].shape[0]
        chunk = self.batch_size or rows
        scores = [
            sequence_rewards(self.model.model, *(t[start : start + chunk] for t in tensors))
            for start in range(0, rows, chunk)
        ]
        return torch.cat(scores).float()

    def retokenize(self, responses: Responses) -> list[Tensor]:
        rows = []
        conversations = responses.conversations or [None] * len(responses.completions)
        for prompt, completion, conversation in zip(responses.prompts, responses.completions, conversations):
            if isinstance(prompt, str):
                ids = text_mask(self.tokenizer, prompt, completion)[0]
            else:
                after = conversation if conversation is not None else [{"role": "assistant", "content": completion}]
                ids = chat_ids(self.tokenizer, [*prompt, *after], add_generation_prompt=False)
            rows.append(ids[-self.max_length :])
        device = responses.input_ids.device
        input_ids = pad_rows(rows, self.tokenizer.pad_token_id).to(device)
        attention_mask = pad_rows([[1] * len(row) for row in rows], 0).to(device)
        return [input_ids, attention_mask, position_ids_from(attention_mask)]


class Scores(NamedTuple):
    scores: Tensor
    """(B,) the shaped score PPO optimises (weighted sum, penalty, normalisation, clipping)."""
    per_source: dict[str, Tensor]
    """name -> (B,) each source's raw score, for logging."""


class RewardScorer(nn.Module):
    """The weighted sum of reward sources, shaped as described in the module docstring.

    sources: the reward sources; missing_eos_penalty: subtracted from responses that never
    produced a stop token (None: no penalty); normalize: divide by a running std after removing
    a running mean (statistics of every shaped score so far, all devices); clip: clamp the
    final score to [-clip, clip] (None: no clipping).
    """

    def __init__(
        self,
        sources: Sequence[RewardSource],
        *,
        missing_eos_penalty: float | None = None,
        normalize: bool = False,
        clip: float | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("give at least one reward source")
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"reward sources need distinct names to be logged apart, got {names}")
        self.sources = nn.ModuleList(sources)
        self.missing_eos_penalty = missing_eos_penalty
        self.normalize = normalize
        self.clip = clip
        self.moments = RunningMoments()

    def setup(self, policy_tokenizer: PreTrainedTokenizerBase) -> None:
        for source in self.sources:
            source.setup(policy_tokenizer)

    def forward(self, responses: Responses, gather: Callable[[Tensor], Tensor] = lambda x: x) -> Scores:
        """gather: collects a tensor from every device (for the running statistics)."""
        per_source = {source.name: source(responses) for source in self.sources}
        weighted = torch.stack([source.weight * per_source[source.name] for source in self.sources])
        scores = torch.where(torch.isnan(weighted).all(0), float("nan"), weighted.nansum(0))
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~responses.stopped).float()
        if self.normalize:
            self.moments.update(gather(scores))
            scores = (scores - self.moments.mean.float()) / (self.moments.std.float() + 1e-8)
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return Scores(scores, per_source)
