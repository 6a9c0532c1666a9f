"""Mistral v3 and Nemo: plpost's token ids equal those of mistral-common, Mistral's reference encoder.

mistral-common encodes a training conversation (`ValidationMode.finetuning`) with the system
prompt in the last user turn, where Mistral's chat templates put it when they render a prompt;
rendering a whole conversation, the original templates drop it. plpost refuses such a chat by
name, and with the one-line fix the README gives (cases.MISTRAL_SYSTEM_FIX) the ids are
mistral-common's.
"""

import json
import re

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from plpost import ChatDataModule
from plpost.data.formats import DataValidationError

from .assets import mistral_common_file, tokenizer_folder
from .cases import TEMPLATES_BY_NAME, case_rows
from .conftest import original_template_file

REFERENCE_FILES = {"mistral-v3": "mistral_instruct_tokenizer_240323.model.v3", "mistral-nemo": "tekken_240718.json"}


def openai_messages(messages: list[dict]) -> list[dict]:
    """The OpenAI form that mistral-common reads: tool-call arguments as a JSON string."""
    converted = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]
        if message["role"] == "tool":
            message.pop("name", None)
        converted.append(message)
    return converted


def reference_ids(template_name: str, row: dict) -> list[int]:
    encoder = MistralTokenizer.from_file(
        str(mistral_common_file(REFERENCE_FILES[template_name])), mode=ValidationMode.finetuning
    )
    messages = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
    request = ChatCompletionRequest.from_openai(openai_messages(messages), tools=row.get("tools"))
    return encoder.encode_chat_completion(request).tokens


@pytest.mark.parametrize("template_name", list(REFERENCE_FILES))
@pytest.mark.parametrize("case", ["single", "multi_turn", "system", "prompt_completion", "tool_call"])
def test_token_ids_equal_mistral_commons_encoder(chat_examples, template_name, case):
    template = TEMPLATES_BY_NAME[template_name]
    _, example = chat_examples.get(template, case)
    assert example["input_ids"] == reference_ids(template_name, case_rows(template.tool_call_content)[case])


@pytest.mark.parametrize("template_name", list(REFERENCE_FILES))
@pytest.mark.parametrize(("case", "field"), [("system", "messages[0].content"), ("prompt_completion", "prompt[0].content")])
def test_the_original_templates_drop_the_system_prompt_and_are_refused_by_name(template_name, case, field):
    template = TEMPLATES_BY_NAME[template_name]
    data = ChatDataModule(
        str(tokenizer_folder(template.tokenizer)), train=[case_rows(template.tool_call_content)[case]],
        chat_template=str(original_template_file(template)),
    )
    with pytest.raises(DataValidationError, match=f'record 0, field "{re.escape(field)}": the chat template does not render'):
        data.setup("fit")
