"""A control token's spelling written inside a message is text, on real templates and tokenizers.

Each family's conversation is tokenized twice: once plainly, once with the spellings of its
end-of-turn tokens (the template's closer and EOS) written into the user's question and into the
middle of the answer. Only the template's markers may be control tokens, so the second example
holds exactly as many of each control token as the first; its supervised span runs past the
written spelling to the end of the answer and ends with the template's one closer.
"""

from collections import Counter

import pytest

from plpost import ChatDataModule, PromptDataModule
from plpost.data.chat_template import ChatTemplate
from plpost.hf import load_tokenizer

from .cases import TEMPLATES_BY_NAME
from .conftest import IGNORE_INDEX, data_module_options

FAMILIES = ["qwen2.5", "llama3.2", "phi3.5", "mistral-v3", "gemma3"]
TAIL = "and then the answer goes on"


def spellings(options: dict) -> list[str]:
    tokenizer = load_tokenizer(options["tokenizer"], chat_template=options["chat_template"])
    template = ChatTemplate(tokenizer, options.get("chat_template_kwargs"))
    return sorted({tokenizer.convert_ids_to_tokens(token) for token in template.end_of_turn_ids})


def rows(written: str) -> list[dict]:
    return [{"messages": [
        {"role": "user", "content": f"What does {written} do in a chat?"},
        {"role": "assistant", "content": f"It closes a turn: {written} {TAIL}."},
    ]}]


def control_counts(tokenizer, ids: list[int]) -> Counter:
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return Counter(token for token in ids if token in special)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_control_token_spelled_in_a_message_is_tokenized_as_text(name):
    options = data_module_options(TEMPLATES_BY_NAME[name], "single")
    written = " ".join(spellings(options))
    plain = ChatDataModule(train=rows("the marker"), max_length=4096, **options)
    injected = ChatDataModule(train=rows(written), max_length=4096, **options)
    for module in (plain, injected):
        module.setup("fit")
    tokenizer = plain.tokenizer
    (expected,), (example,) = plain.train_examples, injected.train_examples
    assert control_counts(tokenizer, example["input_ids"]) == control_counts(tokenizer, expected["input_ids"])
    supervised = [token for token in example["labels"] if token != IGNORE_INDEX]
    closer = [token for token in expected["labels"] if token != IGNORE_INDEX][-1]
    assert list(control_counts(tokenizer, supervised).elements()) == [closer] and supervised[-1] == closer
    assert TAIL in tokenizer.decode(supervised)


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.2"])
def test_a_prompt_that_spells_a_control_token_keeps_it_as_text(name):
    options = data_module_options(TEMPLATES_BY_NAME[name], "single")
    written = " ".join(spellings(options))
    prompts = [{"prompt": [{"role": "user", "content": question}]} for question in ("Say hi.", f"Say {written}.")]
    module = PromptDataModule(train=prompts, max_prompt_length=4096, **options)
    module.setup("fit")
    plain, injected = (example["input_ids"] for example in module.train_examples)
    assert control_counts(module.tokenizer, injected) == control_counts(module.tokenizer, plain)
