"""Golden masks on real chat templates and real tokenizers (see SUPERVISION.md for each family).

Every supervised span of `labels`, decoded, is exactly one assistant turn's generated text: its
content (with the reasoning or tool call that the template renders in that turn) and its
end-of-turn marker, as written by hand in cases.py; and the whole sequence is the template's
own rendering of the conversation.
"""

import pytest

from .cases import TEMPLATES, case_rows
from .conftest import supervised_texts, template_kwargs

CASES = [pytest.param(template, case, id=f"{template.name}-{case}") for template in TEMPLATES for case in template.cases]

@pytest.mark.parametrize(("template", "case"), CASES)
def test_supervised_spans_are_exactly_the_assistant_turns(chat_examples, template, case):
    module, example = chat_examples.get(template, case)
    assert supervised_texts(module.tokenizer, example) == template.expected(case)


@pytest.mark.parametrize(("template", "case"), CASES)
def test_input_ids_are_the_template_rendering_of_the_whole_conversation(chat_examples, template, case):
    module, example = chat_examples.get(template, case)
    row = case_rows(template.tool_call_content)[case]
    messages = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
    rendered = module.tokenizer.apply_chat_template(
        messages, tools=row.get("tools"), tokenize=False, **template_kwargs(template, case)
    )
    # Compared as tokens: some decoders add a space after special tokens that the text does not have.
    assert example["input_ids"] == module.tokenizer(rendered, add_special_tokens=False)["input_ids"]
