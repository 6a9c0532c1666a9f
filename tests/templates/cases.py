"""The conversations tried on every real template, the templates, and what each one must supervise.

The expected supervised text is written by hand per family from reading its template (the
table is SUPERVISION.md); it never comes from rendering, so it checks the masking method
instead of repeating it. A turn's supervised text is what the model generates after its
generation prompt: the content (with the reasoning or tool-call text the template renders in
that turn) and the end-of-turn marker, never the role header, and never what follows the marker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

SYSTEM = "You answer in one short sentence."
QUESTION, ANSWER = "What is the capital of France?", "Paris is the capital of France."
FOLLOW_UP, SECOND_ANSWER = "And of Italy?", "Rome is the capital of Italy."
REASONING, SECOND_REASONING = "The user asks about France.", "Now Italy; its capital is Rome."
WEATHER_QUESTION, WEATHER_ANSWER = "How warm is it in Paris?", "It is 22 degrees in Paris."
WEATHER = '{"celsius": 22}'  # tool results are JSON; Mistral's templates and encoder render it alike
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The current temperature of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
CALL_ID = "call00042"  # Mistral's templates require 9 alphanumeric characters


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def tool_call_turn(content: str | None) -> dict:
    call = {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


TOOL_RESULT = {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": WEATHER}


def case_rows(tool_call_content: str | None) -> dict[str, dict]:
    """Each case as a ChatDataModule row."""
    return {
        "single": {"messages": [user(QUESTION), assistant(ANSWER)]},
        "multi_turn": {"messages": [user(QUESTION), assistant(ANSWER), user(FOLLOW_UP), assistant(SECOND_ANSWER)]},
        "system": {"messages": [
            {"role": "system", "content": SYSTEM}, user(QUESTION), assistant(ANSWER), user(FOLLOW_UP),
            assistant(SECOND_ANSWER),
        ]},
        "tool_call": {"messages": [
            user(WEATHER_QUESTION), tool_call_turn(tool_call_content), TOOL_RESULT, assistant(WEATHER_ANSWER),
        ], "tools": TOOLS},
        "reasoning": {"messages": [
            user(QUESTION), assistant(ANSWER, REASONING), user(FOLLOW_UP), assistant(SECOND_ANSWER, SECOND_REASONING),
        ]},
        # DeepSeek-R1 keeps its reasoning in the content, in a <think> block.
        "inline_reasoning": {"messages": [
            user(QUESTION), assistant(f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"), user(FOLLOW_UP),
            assistant(f"<think>\n{SECOND_REASONING}\n</think>\n\n{SECOND_ANSWER}"),
        ]},
        "no_thinking": {"messages": [user(QUESTION), assistant(ANSWER), user(FOLLOW_UP), assistant(SECOND_ANSWER)]},
        "prompt_completion": {
            "prompt": [{"role": "system", "content": SYSTEM}, user(QUESTION)], "completion": [assistant(ANSWER)],
        },
    }


# Only the "no_thinking" case renders with enable_thinking off.
CASE_TEMPLATE_KWARGS = {"no_thinking": {"enable_thinking": False}}


def basic_cases(end: str, lead: str = "") -> dict[str, list[str]]:
    """The cases where every assistant turn is its content (after `lead`) and the family's end-of-turn marker."""
    return {
        "single": [lead + ANSWER + end],
        "multi_turn": [lead + ANSWER + end, lead + SECOND_ANSWER + end],
        "system": [lead + ANSWER + end, lead + SECOND_ANSWER + end],
        "prompt_completion": [lead + ANSWER + end],
    }


def chatml(end: str = "<|im_end|>") -> Callable[[str], list[str]]:
    """Qwen2.5 and the like: every assistant turn is its content and <|im_end|>; Hermes-style tool calls."""
    tool_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    return lambda case: {
        **basic_cases(end),
        "tool_call": [tool_call + end, WEATHER_ANSWER + end],
    }[case]


def qwen3(case: str) -> list[str]:
    """Turns after the last user query carry a <think> block (empty when there is no reasoning) unless
    enable_thinking is off; earlier turns lose their reasoning. A tool-call turn with no reasoning
    that is not the last turn has no block."""
    end, empty = "<|im_end|>", "<think>\n\n</think>\n\n"
    tool_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    return {
        "single": [empty + ANSWER + end],
        "multi_turn": [ANSWER + end, empty + SECOND_ANSWER + end],
        "system": [ANSWER + end, empty + SECOND_ANSWER + end],
        "prompt_completion": [empty + ANSWER + end],
        "reasoning": [ANSWER + end, f"<think>\n{SECOND_REASONING}\n</think>\n\n{SECOND_ANSWER}{end}"],
        "no_thinking": [ANSWER + end, SECOND_ANSWER + end],  # the empty block is in the generation prompt
        "tool_call": [tool_call + end, empty + WEATHER_ANSWER + end],
    }[case]


def qwen3_training(case: str) -> list[str]:
    """TRL's prefix-preserving Qwen3 variant: every assistant turn carries its <think> block."""
    end, empty = "<|im_end|>", "<think>\n\n</think>\n\n"
    tool_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    return {
        "single": [empty + ANSWER + end],
        "multi_turn": [empty + ANSWER + end, empty + SECOND_ANSWER + end],
        "system": [empty + ANSWER + end, empty + SECOND_ANSWER + end],
        "prompt_completion": [empty + ANSWER + end],
        "reasoning": [
            f"<think>\n{REASONING}\n</think>\n\n{ANSWER}{end}", f"<think>\n{SECOND_REASONING}\n</think>\n\n{SECOND_ANSWER}{end}",
        ],
        "tool_call": [empty + tool_call + end, empty + WEATHER_ANSWER + end],
    }[case]


def llama3(case: str) -> list[str]:
    """Content and <|eot_id|>; a tool call is one bare JSON object with "parameters"."""
    end = "<|eot_id|>"
    return {
        **basic_cases(end),
        "tool_call": ['{"name": "get_weather", "parameters": {"city": "Paris"}}' + end, WEATHER_ANSWER + end],
    }[case]


def gemma(case: str) -> list[str]:
    """Gemma 2 and 3: the `model` role, content and <end_of_turn>; Gemma 3 folds the system prompt into
    the first user turn (Gemma 2 refuses it)."""
    end = "<end_of_turn>"
    return {
        **basic_cases(end),
    }[case]


GEMMA4_TOOL_CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'


def gemma4(case: str) -> list[str]:
    """Content and <turn|>. The tool call, the tool's response and the answer share one model turn:
    the call up to <|tool_response> (where the model hands over to the tool) and the answer are
    supervised, the response between them is not."""
    end = "<turn|>"
    return {
        **basic_cases(end),
        "tool_call": [GEMMA4_TOOL_CALL + "<|tool_response>", WEATHER_ANSWER + end],
    }[case]


def gemma4_release(case: str) -> list[str]:
    """The release revision: the tool call ends its own model turn, the tool answers in a `tool` turn."""
    if case == "tool_call":
        return [GEMMA4_TOOL_CALL + "<turn|>", WEATHER_ANSWER + "<turn|>"]
    return gemma4(case)


def gemma4_current(case: str) -> list[str]:
    """The current revision also renders the reasoning of the final turn (earlier turns lose it)."""
    if case == "reasoning":
        return [ANSWER + "<turn|>", f"<|channel>thought\n{SECOND_REASONING}\n<channel|>{SECOND_ANSWER}<turn|>"]
    return gemma4(case)


def mistral(space: str) -> Callable[[str], list[str]]:
    """Content and </s> (v3 puts a space before both); a tool call is [TOOL_CALLS] and a JSON list.
    The system prompt goes into the last user turn."""
    end = "</s>"
    tool_call = f'[TOOL_CALLS]{space}[{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{CALL_ID}"}}]'
    return lambda case: {
        **basic_cases(end, space),
        "tool_call": [tool_call + end, space + WEATHER_ANSWER + end],
    }[case]


def phi3(case: str) -> list[str]:
    """Content and <|end|>; the newline and the EOS that the template appends after the last <|end|>
    are not generated by the model, so they are not supervised."""
    end = "<|end|>"
    return {
        **basic_cases(end),
    }[case]


def deepseek_r1(case: str) -> list[str]:
    """Content and <｜end▁of▁sentence｜> after the <｜Assistant｜> role token. The original template
    keeps only what follows </think> in every assistant turn (here the blank line after it); its
    generation prompt opens a <think> block that the rendered turns do not have."""
    end = "<｜end▁of▁sentence｜>"
    return {
        **basic_cases(end),
        "inline_reasoning": ["\n\n" + ANSWER + end, "\n\n" + SECOND_ANSWER + end],
    }[case]


def deepseek_r1_training(case: str) -> list[str]:
    """TRL's variant keeps the reasoning. Its generation block holds the <｜Assistant｜> role token,
    which is still not supervised, and the generation prompt ends with "<think>\n", so the model
    generates the reasoning from there on."""
    if case == "inline_reasoning":
        end = "<｜end▁of▁sentence｜>"
        return [f"{REASONING}\n</think>\n\n{ANSWER}{end}", f"{SECOND_REASONING}\n</think>\n\n{SECOND_ANSWER}{end}"]
    return deepseek_r1(case)


def smollm3(case: str) -> list[str]:
    """ChatML; the system prompt is wrapped in a metadata block. With thinking off every assistant
    turn starts with an empty <think> block, which the generation prompt also holds (not supervised)."""
    return chatml()(case if case != "no_thinking" else "multi_turn")


@dataclass(frozen=True)
class Template:
    """One real template file, the tokenizer it runs with, and the cases it can render."""

    name: str
    source: str  # "trl", "llama.cpp" or "axolotl"
    file: str
    tokenizer: str
    expected: Callable[[str], list[str]]
    cases: tuple[str, ...]
    template_kwargs: dict = field(default_factory=dict)
    tool_call_content: str | None = None  # "" where the template cannot read a null content
    fix: tuple[str, str] | None = None  # (text, replacement) applied to the file: a known fix users apply too


# Mistral's templates put the system prompt into the user turn only when that turn ends the
# conversation, so a training chat loses it (plpost refuses such a chat by name); in the last user
# turn, where mistral-common's encoder puts it, is the fix the README gives.
MISTRAL_SYSTEM_FIX = ("loop.last and system_message is defined", "message == user_messages[-1] and system_message is defined")


BASIC = ("single", "multi_turn", "system", "prompt_completion")
NO_SYSTEM = ("single", "multi_turn")
DATE = {"date_string": "26 Jul 2024"}

TEMPLATES = [
    Template("qwen2.5", "llama.cpp", "Qwen-Qwen2.5-7B-Instruct.jinja", "qwen-standin", chatml(), (*BASIC, "tool_call")),
    Template("qwen2.5-training", "trl", "qwen2_5_training.jinja", "qwen-standin", chatml(), (*BASIC, "tool_call")),
    Template("qwen3-0.6b", "llama.cpp", "Qwen-Qwen3-0.6B.jinja", "qwen-standin", qwen3,
             (*BASIC, "reasoning", "no_thinking", "tool_call"), tool_call_content=""),
    Template("qwen3", "trl", "qwen3.jinja", "qwen-standin", qwen3, (*BASIC, "reasoning", "no_thinking", "tool_call")),
    Template("qwen3-training", "trl", "qwen3_training.jinja", "qwen-standin", qwen3_training,
             (*BASIC, "reasoning", "tool_call")),
    Template("llama3.1", "llama.cpp", "meta-llama-Llama-3.1-8B-Instruct.jinja", "llama-bpe", llama3,
             (*BASIC, "tool_call"), DATE),
    Template("llama3.2", "llama.cpp", "meta-llama-Llama-3.2-3B-Instruct.jinja", "llama-bpe", llama3,
             (*BASIC, "tool_call"), DATE),
    Template("llama3-training", "trl", "llama3_training.jinja", "llama-bpe", llama3, BASIC),
    Template("gemma2", "llama.cpp", "google-gemma-2-2b-it.jinja", "gemma3-standin", gemma, NO_SYSTEM),
    Template("gemma2-training", "trl", "gemma_training.jinja", "gemma3-standin", gemma, NO_SYSTEM),
    Template("gemma3", "trl", "gemma3.jinja", "gemma3-standin", gemma, BASIC),
    Template("gemma3-training", "trl", "gemma3_training.jinja", "gemma3-standin", gemma, BASIC),
    Template("gemma4-31b", "llama.cpp", "google-gemma-4-31B-it.jinja", "gemma-4", gemma4, (*BASIC, "tool_call")),
    Template("gemma4", "trl", "gemma4.jinja", "gemma-4", gemma4, (*BASIC, "tool_call")),
    Template("gemma4-v2", "trl", "gemma4_v2.jinja", "gemma-4", gemma4_release, (*BASIC, "tool_call")),
    Template("gemma4-v5", "trl", "gemma4_v5.jinja", "gemma-4", gemma4_current, (*BASIC, "reasoning", "tool_call")),
    Template("mistral-v3", "axolotl", "mistral_v2v3.jinja", "mistral-v3", mistral(" "), (*BASIC, "tool_call"),
             fix=MISTRAL_SYSTEM_FIX),
    Template("mistral-nemo", "llama.cpp", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral-nemo", mistral(""),
             (*BASIC, "tool_call"), fix=MISTRAL_SYSTEM_FIX),
    Template("phi3.5", "llama.cpp", "microsoft-Phi-3.5-mini-instruct.jinja", "phi-3", phi3, BASIC),
    Template("phi3.5-training", "trl", "phi3_5_training.jinja", "phi-3", phi3, BASIC),
    Template("phi3", "trl", "phi3.jinja", "phi-3", phi3, BASIC),
    Template("deepseek-r1-distill-qwen", "llama.cpp", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
             "deepseek-r1-distill-qwen-standin", deepseek_r1, (*BASIC, "inline_reasoning")),
    Template("deepseek-r1-distill", "trl", "deepseek_r1_distill.jinja", "deepseek-r1-distill-qwen-standin",
             deepseek_r1, (*BASIC, "inline_reasoning")),
    Template("deepseek-r1-distill-training", "trl", "deepseek_r1_distill_training.jinja",
             "deepseek-r1-distill-qwen-standin", deepseek_r1_training, (*BASIC, "inline_reasoning")),
    Template("smollm3", "llama.cpp", "HuggingFaceTB-SmolLM3-3B.jinja", "smollm3-standin", smollm3,
             (*BASIC, "no_thinking")),
]
TEMPLATES_BY_NAME = {template.name: template for template in TEMPLATES}
