"""Multi-turn episodes (plpost.episodes) with a scripted policy on the bundled tokenizer's real
chat template: the ids trained are the ids sampled, the environment's replies are what the
template writes, only the policy's tokens are in the mask, and every limit ends an episode."""

from __future__ import annotations

import pytest
import torch

from transformers.utils import get_json_schema

from plpost.data.chat_template import ChatTemplate
from plpost.environments import Environment, Episode, Reply
from plpost.episodes import EpisodePlayer
from plpost.generation import stop_token_ids

USER = [{"role": "user", "content": "12+34"}]


class Scripted:
    """A policy that writes `turns` in order, one per call and row; token ids, stop token included
    (or cut at `max_new_tokens`), the pad token after, as the sampler returns them."""

    def __init__(self, tokenizer, turns: list[str], max_new_tokens: int = 64) -> None:
        self.tokenizer, self.turns, self.max_new_tokens = tokenizer, turns, max_new_tokens
        self.calls, self.contexts = 0, []

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, input_ids, attention_mask, num_samples):
        rows = []
        for row, mask in zip(input_ids.repeat_interleave(num_samples, 0), attention_mask.repeat_interleave(num_samples, 0)):
            self.contexts.append(row[mask.bool()].tolist())
            rows.append(self.ids(self.turns[self.calls])[: self.max_new_tokens])
        self.calls += 1
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


class Nagging(Environment):
    """Answers every turn with "again" until `rounds` turns were written, then ends with reward 1."""

    def __init__(self, rounds: int, **limits) -> None:
        super().__init__(**limits)
        self.rounds = rounds

    def start(self, prompt, **columns):
        return Nag(self)


class Nag(Episode):
    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.turns = 0

    def respond(self, message):
        self.turns += 1
        if self.turns >= self.environment.rounds:
            return Reply(done=True, reward=1.0)
        return Reply([{"role": "user", "content": "again"}], reward=0.25)


@pytest.fixture(scope="module")
def template(tokenizer) -> ChatTemplate:
    return ChatTemplate(tokenizer)


def player(template, environment, max_new_tokens=64, max_positions=None) -> EpisodePlayer:
    return EpisodePlayer(environment, template, stop_ids=stop_token_ids(template.tokenizer),
                         max_new_tokens=max_new_tokens, max_positions=max_positions)


def test_the_trained_ids_are_the_sampled_ids_and_replies_are_what_the_template_writes(template, tokenizer):
    """Three turns, two replies. The ids after the prompt are the sampled turns verbatim, with the
    replies between them; the whole equals the template's rendering of the conversation (for this
    template, which writes a turn as the policy sampled it); the mask is 1 exactly on the sampled ids."""
    turns = ["46<|end|>", "56<|end|>", "46 it is<|end|>"]
    policy = Scripted(tokenizer, turns)
    episodes = player(template, Nagging(rounds=3)).play(policy, [USER], {}, 1)
    samples = episodes.samples
    prompt_width = samples.input_ids.shape[1] - samples.response_mask.shape[1]
    after = samples.input_ids[0, prompt_width:][samples.attention_mask[0, prompt_width:].bool()].tolist()
    policy_ids = samples.input_ids[0, prompt_width:][samples.response_mask[0]].tolist()
    assert policy_ids == sum((policy.ids(t) for t in turns), [])
    conversation = [*USER, {"role": "assistant", "content": "46"}, {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "56"}, {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "46 it is"}]
    whole = tokenizer(template.render(conversation), add_special_tokens=False)["input_ids"]
    prompt = template.prompt_ids(USER)
    assert prompt + after == whole
    reply = policy.ids("<|user|>again<|end|><|assistant|>")
    expected_mask = [1] * 3 + [0] * len(reply) + [1] * 3 + [0] * len(reply) + [1] * len(policy.ids(turns[2]))
    assert samples.response_mask[0, : len(expected_mask)].int().tolist() == expected_mask
    assert samples.attention_mask[0, prompt_width:].sum() == len(expected_mask)
    # Each turn was sampled from everything before it, the replies included.
    assert policy.contexts[1] == prompt + policy.ids(turns[0]) + reply
    assert episodes.environment_rewards.tolist() == [1.5] and episodes.rewarded
    assert episodes.completions == ["46 it is"]
    assert [m["role"] for m in episodes.conversations[0]] == ["assistant", "user", "assistant", "user", "assistant"]
    assert episodes.statistics["turns"].tolist() == [3.0] and episodes.statistics["truncated"].tolist() == [0.0]
    assert samples.stopped.tolist() == [True]


def test_episodes_that_end_at_different_turns_share_one_batch(template, tokenizer):
    """G = 2 episodes of each of two prompts: the rows of one prompt are consecutive, and an episode
    that ended is not sampled again (the second call has fewer rows than the first)."""

    class EndsOnStop(Environment):
        def start(self, prompt, **columns):
            return Stopper(self)

    class Stopper(Episode):
        def respond(self, message):
            if message["content"] == "stop":
                return Reply(done=True)
            return Reply([{"role": "user", "content": "go on"}])

    calls = []

    def policy(input_ids, attention_mask, num_samples):
        calls.append(input_ids.shape[0] * num_samples)
        texts = ["stop<|end|>", "more<|end|>", "stop<|end|>", "more<|end|>"] if len(calls) == 1 else ["stop<|end|>"] * 2
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, ids))
        return torch.tensor([r + [0] * (width - len(r)) for r in ids])

    prompts = [USER, [{"role": "user", "content": "5+5"}]]
    episodes = player(template, EndsOnStop()).play(policy, prompts, {"answer": ["46", "10"]}, 2)
    assert calls == [4, 2]
    assert episodes.statistics["turns"].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert episodes.samples.response_mask.sum(1).tolist() == [5, 10, 5, 10]
    assert not episodes.rewarded and episodes.environment_rewards.tolist() == [0.0] * 4


@pytest.mark.parametrize("limit, expected_turns", [({"max_turns": 2}, 2), ({"max_episode_tokens": 11}, 1)])
def test_turn_and_token_limits_end_an_episode_as_truncated(template, tokenizer, limit, expected_turns):
    """max_turns = 2 stops after the second turn, its reply unshown; an 11-token budget holds a
    3-token turn and an 8-token reply (<|user|>again<|end|><|assistant|>) but no room to answer it,
    so the reply is not shown."""
    policy = Scripted(tokenizer, ["46<|end|>"] * 5)
    episodes = player(template, Nagging(rounds=5, **limit)).play(policy, [USER], {}, 1)
    assert episodes.statistics["turns"].tolist() == [expected_turns]
    assert episodes.statistics["truncated"].tolist() == [1.0]
    assert episodes.samples.response_mask.sum() == 3 * expected_turns
    assert episodes.samples.attention_mask.sum() == len(template.prompt_ids(USER)) + 3 * expected_turns + 8 * (expected_turns - 1)


def test_a_turn_cut_at_max_new_tokens_ends_the_episode_unanswered(template, tokenizer):
    policy = Scripted(tokenizer, ["1234567890<|end|>"], max_new_tokens=4)
    episodes = player(template, Nagging(rounds=3), max_new_tokens=4).play(policy, [USER], {}, 1)
    assert episodes.samples.response_mask.sum() == 4
    assert episodes.samples.stopped.tolist() == [False] and episodes.statistics["truncated"].tolist() == [1.0]
    assert not episodes.rewarded


def test_the_model_context_bounds_the_episode(template, tokenizer):
    prompt = template.prompt_ids(USER)
    policy = Scripted(tokenizer, ["46<|end|>"] * 5)
    episodes = player(template, Nagging(rounds=5), max_positions=len(prompt) + 3 + 8).play(policy, [USER], {}, 1)
    assert episodes.statistics["turns"].tolist() == [1.0] and episodes.statistics["truncated"].tolist() == [1.0]
    assert episodes.samples.attention_mask.sum() == len(prompt) + 3


def test_a_reply_that_is_not_a_message_names_the_environment(template, tokenizer):
    class Broken(Environment):
        def start(self, prompt, **columns):
            return Answers(self)

    class Answers(Episode):
        def respond(self, message):
            return Reply(["not a message"])

    with pytest.raises(TypeError, match="Broken replied 'not a message'"):
        player(template, Broken()).play(Scripted(tokenizer, ["46<|end|>"]), [USER], {}, 1)


def test_string_prompts_are_refused_with_the_fix(template, tokenizer):
    with pytest.raises(ValueError, match="message prompts"):
        player(template, Nagging(rounds=2)).play(Scripted(tokenizer, ["x<|end|>"]), ["12+34"], {}, 1)


# -- tool calls on real templates (Qwen2.5 and Qwen3 write them in the Hermes format) ---------------

def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first addend
        b: the second addend
    """
    return a + b


@pytest.fixture(scope="module", params=["Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja"])
def qwen(request) -> ChatTemplate:
    from transformers import AutoTokenizer

    from templates.assets import llama_cpp_models, tokenizer_folder

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder("qwen-standin")))
    tokenizer.chat_template = (llama_cpp_models() / "templates" / request.param).read_text()
    return ChatTemplate(tokenizer)


def tool_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call><|im_end|>'


def test_a_tool_call_runs_and_its_result_is_rendered_as_the_template_would(qwen):
    """Turn 1 calls add(a=12, b=34) in the Hermes format; the environment runs it and the reply is
    the template's <tool_response> block (both templates write a tool result after the turn's
    <|im_end|> as below); turn 2 answers. The mask holds exactly the sampled turns. Qwen2.5 writes
    a turn as it was sampled, so there the ids equal its rendering of the whole conversation; Qwen3
    writes an empty <think> block into a last turn, which the policy did not sample."""
    tokenizer = qwen.tokenizer
    turns = [tool_call("add", '{"a": 12, "b": 34}'), "46<|im_end|>"]
    policy = Scripted(tokenizer, turns)
    episodes = player(qwen, Environment(tools=[add])).play(policy, [USER], {}, 1)
    assert episodes.conversations[0][0]["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 34}}}]
    assert episodes.conversations[0][1] == {"role": "tool", "name": "add", "content": "46"}
    assert episodes.completions == ["46"]
    assert episodes.statistics["tool_calls"].tolist() == [1.0] and episodes.statistics["tool_errors"].tolist() == [0.0]
    samples = episodes.samples
    prompt = qwen.prompt_ids(USER, [get_json_schema(add)])
    width = samples.input_ids.shape[1] - samples.response_mask.shape[1]
    after = samples.input_ids[0, width:][samples.attention_mask[0, width:].bool()].tolist()
    assert samples.input_ids[0, :width][samples.attention_mask[0, :width].bool()].tolist() == prompt
    reply = samples.input_ids[0, width:][samples.attention_mask[0, width:].bool() & ~samples.response_mask[0]]
    assert tokenizer.decode(reply) == "\n<|im_start|>user\n<tool_response>\n46\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert samples.input_ids[0, width:][samples.response_mask[0]].tolist() == sum((policy.ids(t) for t in turns), [])
    if "<think>" not in tokenizer.chat_template:  # Qwen2.5
        conversation = [*USER, *episodes.conversations[0][:2], {"role": "assistant", "content": "46"}]
        assert prompt + after == qwen.encode(qwen.render(conversation, tools=[get_json_schema(add)]))[0][:-1]
    assert episodes.statistics["turns"].tolist() == [2.0]


@pytest.mark.parametrize("call, error", [
    (tool_call("subtract", '{"a": 1, "b": 2}'), "error: LookupError: no tool named 'subtract'"),
    (tool_call("add", '{"a": 1}'), "error: TypeError"),
])
def test_a_failing_call_is_answered_with_its_error(qwen, call, error):
    policy = Scripted(qwen.tokenizer, [call, "3<|im_end|>"])
    episodes = player(qwen, Environment(tools=[add])).play(policy, [USER], {}, 1)
    assert episodes.conversations[0][1]["content"].startswith(error)
    assert episodes.statistics["tool_errors"].tolist() == [1.0] and episodes.statistics["turns"].tolist() == [2.0]


def test_a_malformed_call_is_an_answer_the_policy_sees_not_a_crash(qwen):
    policy = Scripted(qwen.tokenizer, ['<tool_call>\n{"name": "add", "argu\n</tool_call><|im_end|>', "3<|im_end|>"])
    episodes = player(qwen, Environment(tools=[add])).play(policy, [USER], {}, 1)
    assert episodes.statistics["malformed"].tolist() == [1.0] and episodes.statistics["tool_calls"].tolist() == [0.0]
    assert episodes.conversations[0][1]["content"].startswith("error: malformed tool call")
    assert episodes.statistics["turns"].tolist() == [2.0]
    assert "<tool_response>\nerror: malformed tool call" in qwen.tokenizer.decode(policy.contexts[1])


def test_a_template_whose_tool_calls_cannot_be_read_is_named():
    from transformers import AutoTokenizer

    from templates.assets import llama_cpp_models, tokenizer_folder

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder("llama-bpe")))
    tokenizer.chat_template = (llama_cpp_models() / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    with pytest.raises(ValueError, match="has no response_template and its chat template does not write tool calls"):
        player(ChatTemplate(tokenizer), Environment(tools=[add]))


@pytest.mark.parametrize("call", ['<tool_call>\n[12, 34]\n</tool_call><|im_end|>',
                                  '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call><|im_end|>'])
def test_a_call_of_the_wrong_shape_is_malformed(qwen, call):
    """Valid JSON that is not a call (a list, no name) is read as malformed, not run nor rendered."""
    policy = Scripted(qwen.tokenizer, [call, "3<|im_end|>"])
    episodes = player(qwen, Environment(tools=[add])).play(policy, [USER], {}, 1)
    assert episodes.statistics["malformed"].tolist() == [1.0] and episodes.statistics["tool_calls"].tolist() == [0.0]
    assert "tool_calls" not in episodes.conversations[0][0]


def test_a_call_without_arguments_is_run_with_none(qwen):
    """{"name": "add"} is a call: add() then fails for want of its arguments, an error the policy sees."""
    policy = Scripted(qwen.tokenizer, ['<tool_call>\n{"name": "add"}\n</tool_call><|im_end|>', "3<|im_end|>"])
    episodes = player(qwen, Environment(tools=[add])).play(policy, [USER], {}, 1)
    assert episodes.statistics["tool_errors"].tolist() == [1.0] and episodes.statistics["malformed"].tolist() == [0.0]
    assert episodes.conversations[0][0]["tool_calls"][0]["function"]["arguments"] == {}
    assert "missing 2 required positional arguments" in episodes.conversations[0][1]["content"]
