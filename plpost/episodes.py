"""Multi-turn episodes: the policy and an environment (`plpost.environments`) take turns, and
what was played becomes `Samples` that the online stages train on as they train on one turn.

Exact tokens. The ids the policy sampled are the ids it is trained on: a policy turn is never
decoded and encoded again (a re-tokenized turn can differ from the sampled one, and the ratio
and KL would then be those of tokens nobody sampled). Only the environment's replies are
rendered, by the chat template, and appended as ids: the template renders a minimal
conversation, [user, assistant (the turn's tool calls, no content)], followed by the reply and
the generation prompt; what follows the stop token that ends the assistant's turn is the reply.
That is how the template would write the reply after the turn the policy ended with its stop token.

What the stages see: `Samples` whose response part is everything after the prompt, the
environment's tokens attended to (attention_mask 1) but outside `response_mask`, which holds
the policy's tokens only. Every loss, KL term, value loss and normaliser is masked by it, so no
environment token is ever supervised, penalised or counted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from plpost.data.chat_template import ChatTemplate
from plpost.data.collate import pad_rows
from plpost.environments import Environment, Episode, Message, Reply
from plpost.rollout import Samples, position_ids_from
from plpost.tool_calls import response_template_of, well_formed_calls

TurnSampler = Callable[[Tensor, Tensor, int], Tensor]
"""(input_ids (B, T) left-padded, attention_mask (B, T), num_samples) -> (B * num_samples, R)
sampled ids, the pad token after each row's first stop token (`plpost.sampling.complete`)."""

EPISODE_STATISTICS = ("turns", "tool_calls", "tool_errors", "malformed", "truncated", "episode_tokens")


class Episodes(NamedTuple):
    """B prompts x G episodes, the G of a prompt in consecutive rows.

    samples: the prompts and everything after them (see the module docstring); `stopped`: every
        policy turn ended with a stop token within its limits.
    completions: the text of each episode's last assistant turn (what a reward function reads).
    conversations: each episode's messages after its prompt, the assistant turns as parsed.
    environment_rewards: (B * G,) the sum of the rewards the environment gave (0 where it gave none).
    rewarded: whether the environment gave any episode a reward.
    statistics: name -> (B * G,) float per episode: turns, tool_calls, tool_errors, malformed
        (turns the response parser could not read), truncated (stopped by max_turns, the token
        budget or the model's context, not by the policy or the environment), episode_tokens.
    """

    samples: Samples
    completions: list[str]
    conversations: list[list[Message]]
    environment_rewards: Tensor
    rewarded: bool
    statistics: dict[str, Tensor]


@dataclass
class Played:
    """One episode in progress."""

    prompt_ids: list[int]
    episode: Episode
    ids: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)
    conversation: list[Message] = field(default_factory=list)
    completion: str = ""
    reward: float = 0.0
    rewarded: bool = False
    stopped: bool = True
    done: bool = False
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EPISODE_STATISTICS, 0))

    def append(self, ids: Sequence[int], *, by_policy: bool) -> None:
        self.ids.extend(ids)
        self.policy.extend([by_policy] * len(ids))

    def end(self, *, truncated: bool = False) -> None:
        self.done = True
        self.counts["truncated"] = int(truncated)

    def add_reward(self, reward: float | None) -> None:
        if reward is not None:
            self.reward += float(reward)
            self.rewarded = True


class EpisodePlayer:
    """Plays episodes of `environment` with the policy's sampler.

    template: the chat template the prompts were rendered with (the data module's), which
        renders the environment's replies too. stop_ids: the tokens that end a policy turn.
    max_new_tokens: the longest policy turn. max_positions: the model's context (None: no limit).
    """

    def __init__(self, environment: Environment, template: ChatTemplate, *, stop_ids: Sequence[int],
                 max_new_tokens: int, max_positions: int | None = None) -> None:
        self.environment = environment
        self.template = template
        self.stop_ids = set(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.max_positions = max_positions
        self.response_template = response_template_of(template, stop_ids) if environment.tools else None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.template.tokenizer

    def prompt_ids(self, prompt: Sequence[Message], row_tools: list | None) -> list[int]:
        """The prompt rendered with the environment's tool schemas after the row's own."""
        if isinstance(prompt, str):
            raise ValueError(f"an environment's episodes start from message prompts, not the string {prompt[:60]!r}: "
                             "write the prompt as [{'role': 'user', 'content': ...}]")
        tools = [*(row_tools or []), *self.environment.schemas] or None
        return self.template.prompt_ids(prompt, tools)

    @torch.no_grad()
    def play(self, sample_turn: TurnSampler, prompts: Sequence[Sequence[Message]], columns: dict[str, list[Any]],
             num_samples: int, *, device: torch.device | str = "cpu") -> Episodes:
        """`num_samples` episodes of each prompt (its row's other fields in `columns`)."""
        row_tools = columns.get("tools") or [None] * len(prompts)
        prompt_ids = [self.prompt_ids(prompt, tools) for prompt, tools in zip(prompts, row_tools)]
        played = []
        for index, prompt in enumerate(prompts):
            row = {key: values[index] for key, values in columns.items()}
            played += [Played(prompt_ids[index], self.environment.start(prompt, **row)) for _ in range(num_samples)]
        # The first turn samples the G episodes of a prompt from one prefill.
        first = self.sample(sample_turn, prompt_ids, num_samples, device)
        self.take_turns(played, first)
        while live := [episode for episode in played if not episode.done]:
            self.take_turns(live, self.sample(sample_turn, [e.prompt_ids + e.ids for e in live], 1, device))
        return self.episodes(played, device)

    def sample(self, sample_turn: TurnSampler, rows: list[list[int]], num_samples: int, device) -> list[list[int]]:
        input_ids = pad_rows(rows, self.tokenizer.pad_token_id, left=True).to(device)
        attention_mask = pad_rows([[1] * len(row) for row in rows], 0, left=True).to(device)
        return sample_turn(input_ids, attention_mask, num_samples).tolist()

    def take_turns(self, episodes: list[Played], turns: list[list[int]]) -> None:
        for episode, sampled in zip(episodes, turns):
            self.take_turn(episode, sampled)

    def take_turn(self, episode: Played, sampled: list[int]) -> None:
        """Appends the policy's turn, then the environment's reply unless the episode ends."""
        ends_at = next((i + 1 for i, token in enumerate(sampled) if token in self.stop_ids), None)
        turn = sampled[: ends_at if ends_at is not None else self.max_new_tokens]
        room = self.room(episode)
        cut = len(turn) > room
        turn = turn[:room]
        episode.append(turn, by_policy=True)
        episode.counts["turns"] += 1
        message, reply = self.read_turn(episode, turn)
        episode.conversation.append(message)
        episode.completion = message.get("content") or ""
        if ends_at is None or cut:  # a turn cut short is not answered: it was never finished
            episode.stopped = False
            episode.end(truncated=True)
            return
        episode.add_reward(reply.reward)
        episode.counts["tool_calls"] += reply.tool_calls
        episode.counts["tool_errors"] += reply.tool_errors
        messages = checked_messages(reply, self.environment)
        episode.conversation.extend(messages)
        if reply.done or not messages:
            episode.end()
            return
        if episode.counts["turns"] >= self.environment.max_turns:
            episode.end(truncated=True)
            return
        suffix = self.reply_ids(message, messages)
        if len(suffix) >= self.room(episode):  # no room left for the policy to answer
            episode.end(truncated=True)
            return
        episode.append(suffix, by_policy=False)

    def room(self, episode: Played) -> int:
        """Tokens the episode may still add: within its budget and the model's context."""
        limits = [sys.maxsize]
        if self.environment.max_episode_tokens is not None:
            limits.append(self.environment.max_episode_tokens - len(episode.ids))
        if self.max_positions is not None:
            limits.append(self.max_positions - len(episode.prompt_ids) - len(episode.ids))
        return max(min(limits), 0)

    def read_turn(self, episode: Played, turn: list[int]) -> tuple[Message, Reply | None]:
        """The turn as a message, and the environment's reply to it (None for a turn cut short)."""
        text = self.tokenizer.decode(turn, skip_special_tokens=True)
        finished = bool(turn) and turn[-1] in self.stop_ids
        if self.response_template is None:
            message = {"role": "assistant", "content": text}
            return message, episode.episode.respond(message) if finished else None
        context = episode.prompt_ids + episode.ids[: len(episode.ids) - len(turn)]
        try:
            message = self.tokenizer.parse_response(turn, self.response_template, prefix=context,
                                                    tools=self.environment.schemas)
            if message.get("tool_calls"):
                message["tool_calls"] = well_formed_calls(message["tool_calls"])
        except Exception as error:  # whatever the parser raises, the turn is unreadable, not the run broken
            if not finished:
                return {"role": "assistant", "content": text}, None
            episode.counts["malformed"] += 1
            return {"role": "assistant", "content": text}, episode.episode.malformed(text, error)
        # A turn of calls alone parses with no content, which templates (Qwen3) read all the same.
        message = {"role": "assistant", **message, "content": message.get("content") or ""}
        return message, episode.episode.respond(message) if finished else None

    def reply_ids(self, message: Message, reply: list[Message]) -> list[int]:
        """The reply's ids as the template writes them after the policy's turn (see the module docstring)."""
        turn = {"role": "assistant", "content": ""}
        if message.get("tool_calls"):
            turn["tool_calls"] = message["tool_calls"]
        before = [{"role": "user", "content": "."}, turn]
        template = self.template
        try:
            prefix_text = template.render(before)
            full_text = template.render([*before, *reply], add_generation_prompt=True)
        except Exception as error:
            raise ValueError(f"the chat template of {self.tokenizer.name_or_path} cannot render the environment's "
                             f"reply {reply!r}: {error}") from error
        prefix = template.encode_rendering(before, prefix_text)[0]
        full = template.encode_rendering([*before, *reply], full_text, add_generation_prompt=True)[0]
        stops = [i for i, token in enumerate(prefix) if token in self.stop_ids]
        if not stops:
            raise ValueError(f"the chat template of {self.tokenizer.name_or_path} ends an assistant turn with none of "
                             f"the stop tokens {sorted(self.stop_ids)}, so the policy's turn has no end to follow")
        # The reply follows the stop token that ends the assistant's turn, the same-numbered stop in
        # the full rendering: the turn itself may render otherwise once it is no longer the last
        # message (Qwen3 writes an empty <think> block into a last turn only), the user turn may not.
        full_stops = [i for i, token in enumerate(full) if token in self.stop_ids]
        user_turn = stops[-2] + 1 if len(stops) > 1 else 0
        if len(full_stops) < len(stops) or full[:user_turn] != prefix[:user_turn]:
            raise ValueError(f"the chat template of {self.tokenizer.name_or_path} renders a conversation otherwise once "
                             "a reply follows it, so the reply cannot be appended to the policy's turn")
        return full[full_stops[len(stops) - 1] + 1 :]

    def episodes(self, played: list[Played], device) -> Episodes:
        prompt_ids = pad_rows([e.prompt_ids for e in played], self.tokenizer.pad_token_id, left=True)
        prompt_mask = pad_rows([[1] * len(e.prompt_ids) for e in played], 0, left=True)
        after = pad_rows([e.ids for e in played], self.tokenizer.pad_token_id)
        after_mask = pad_rows([[1] * len(e.ids) for e in played], 0)
        policy = pad_rows([[int(p) for p in e.policy] for e in played], 0).bool()
        attention_mask = torch.cat([prompt_mask, after_mask], dim=1)
        samples = Samples(
            input_ids=torch.cat([prompt_ids, after], dim=1).to(device), attention_mask=attention_mask.to(device),
            position_ids=position_ids_from(attention_mask).to(device), response_mask=policy.to(device),
            stopped=torch.tensor([e.stopped for e in played], device=device),
        )
        for e in played:
            e.counts["episode_tokens"] = len(e.ids)
        statistics = {name: torch.tensor([float(e.counts[name]) for e in played], device=device)
                      for name in EPISODE_STATISTICS}
        rewards = torch.tensor([e.reward for e in played], dtype=torch.float32, device=device)
        return Episodes(samples, [e.completion for e in played], [e.conversation for e in played], rewards,
                        any(e.rewarded for e in played), statistics)


def checked_messages(reply: Reply, environment: Environment) -> list[Message]:
    """The reply's messages, refused with the environment named when one is not a message."""
    messages = list(reply.messages)
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "tool", "system") \
                or not isinstance(message.get("content"), str):
            raise TypeError(f"{type(environment).__name__} replied {message!r}: a reply message is a dict with a role "
                            "('user', 'tool' or 'system') and a string content")
    return messages
