"""Prompt sharing (PreferenceDataModule) and prompt rendering (PromptDataModule) on real templates.

A pair's prompt_ids are the prompt as generation sees it (rendered with the generation prompt),
and each completion's ids are exactly the supervised text of that assistant turn (cases.py), so
that prompt + completion is what the policy would have produced. A PPO prompt's input_ids are the
template's rendering with add_generation_prompt=True.
"""

import pytest

from plpost import PreferenceDataModule, PromptDataModule

from .cases import ANSWER, FOLLOW_UP, QUESTION, SECOND_ANSWER, SYSTEM, TEMPLATES_BY_NAME, assistant, user
from .conftest import data_module_options, span_texts

# One template of each family whose prompt layout differs: reasoning blocks, a date header, the
# system prompt folded into a user turn or moved into the last one, a trailing EOS. (Each data
# module loads its tokenizer, seconds for these vocabularies, so the list stays short.)
FAMILIES = ["qwen3", "llama3.2", "gemma3", "mistral-nemo", "phi3.5"]
WRONG, SECOND_WRONG = "Lyon is the capital of France.", "Milan is the capital of Italy."
PROMPTS = {
    "system": ([{"role": "system", "content": SYSTEM}, user(QUESTION)], "prompt_completion", ANSWER, WRONG),
    "multi_turn": ([user(QUESTION), assistant(ANSWER), user(FOLLOW_UP)], "multi_turn", SECOND_ANSWER, SECOND_WRONG),
}


def generation_prompt_ids(tokenizer, template, prompt: list[dict]) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False, **template.template_kwargs
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def preference_modules():
    modules = {}

    def get(name: str) -> PreferenceDataModule:
        if name not in modules:
            rows = [
                {"prompt": prompt, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}
                for prompt, _, chosen, rejected in PROMPTS.values()
            ]
            module = PreferenceDataModule(train=rows, max_length=4096, shuffle=False,
                                          **data_module_options(TEMPLATES_BY_NAME[name], "single"))
            module.setup("fit")
            modules[name] = module
        return modules[name]

    return get


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
@pytest.mark.parametrize("name", FAMILIES)
def test_preference_pairs_share_the_generation_prompt_and_supervise_each_answer(preference_modules, name, prompt_name):
    template = TEMPLATES_BY_NAME[name]
    module = preference_modules(name)
    prompt, case, chosen, rejected = PROMPTS[prompt_name]
    example = module.train_examples[list(PROMPTS).index(prompt_name)]
    assert example["prompt_ids"] == generation_prompt_ids(module.tokenizer, template, prompt)
    (expected,) = [text for text in template.expected(case) if chosen in text]
    for completion, answer in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        ids = list(example["prompt_ids"]) + list(example[completion])
        (text,) = span_texts(module.tokenizer, ids, [(len(example["prompt_ids"]), len(ids))])
        assert text == expected.replace(chosen, answer), completion


@pytest.mark.parametrize("name", FAMILIES)
def test_ppo_prompts_are_the_rendering_with_the_generation_prompt(name):
    template = TEMPLATES_BY_NAME[name]
    prompts = [prompt for prompt, *_ in PROMPTS.values()]
    module = PromptDataModule(train=[{"prompt": prompt} for prompt in prompts], max_prompt_length=4096,
                              shuffle=False, **data_module_options(template, "single"))
    module.setup("fit")
    assert [list(example["input_ids"]) for example in module.train_examples] == [
        generation_prompt_ids(module.tokenizer, template, prompt) for prompt in prompts
    ]
