"""Session fixtures for the real-template tests: one cache and one data module per template for the whole run.

Loading a real tokenizer takes seconds, so every case of a template goes through one
ChatDataModule (one row per case). When that module refuses a record, the record's case keeps
the error and the other cases are set up again without it, so every case reports its own outcome.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from plpost import ChatDataModule

from .assets import axolotl_templates, cache_root, llama_cpp_models, tokenizer_folder, trl_templates
from .cases import CASE_TEMPLATE_KWARGS, Template, case_rows

IGNORE_INDEX = -100


def template_file(template: Template) -> Path:
    folder = {
        "trl": trl_templates, "axolotl": axolotl_templates, "llama.cpp": lambda: llama_cpp_models() / "templates",
    }[template.source]()
    path = folder / template.file
    if not path.is_file():
        raise FileNotFoundError(f"{template.source} ships no {template.file} (in {folder})")
    if template.fix is None:
        return path
    text, replacement = template.fix
    original = path.read_text()
    assert original.count(text) == 1, f"{template.file} no longer holds {text!r} once"
    fixed = cache_root() / "fixed-templates" / f"{template.name}.jinja"
    fixed.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=fixed.parent, suffix=".partial")  # parallel runs never read half a file
    with os.fdopen(handle, "w") as out:
        out.write(original.replace(text, replacement))
    os.replace(partial, fixed)
    return fixed


def original_template_file(template: Template) -> Path:
    return template_file(replace(template, fix=None))


def template_kwargs(template: Template, case: str) -> dict:
    return {**template.template_kwargs, **CASE_TEMPLATE_KWARGS.get(case, {})}


def data_module_options(template: Template, case: str) -> dict:
    """The arguments every data module gets for `template`; chat_template_kwargs only where it renders something."""
    kwargs = template_kwargs(template, case)
    return {
        "tokenizer": str(tokenizer_folder(template.tokenizer)),
        "chat_template": str(template_file(template)),
        **({"chat_template_kwargs": kwargs} if kwargs else {}),
    }


def examples_by_record(module) -> dict[int, dict]:
    return {example["record_index"]: example for example in module.train_examples}


class ChatExamples:
    """The ChatDataModule example of each (template, case), built once per group of cases that render alike."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], tuple[ChatDataModule, dict] | Exception] = {}

    def get(self, template: Template, case: str) -> tuple[ChatDataModule, dict]:
        """The data module and the example of `case`; re-raises what the data module raised for it."""
        if (template.name, case) not in self.outcomes:
            group = [c for c in template.cases if template_kwargs(template, c) == template_kwargs(template, case)]
            self._build(template, group)
        outcome = self.outcomes[(template.name, case)]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _build(self, template: Template, cases: list[str]) -> None:
        rows = case_rows(template.tool_call_content)
        try:
            module = self.setup(template, cases[0], [rows[case] for case in cases])
        except Exception as error:
            refused = getattr(error, "record", None)  # a DataValidationError names the record
            if len(cases) == 1:
                self.outcomes[(template.name, cases[0])] = error
            elif isinstance(refused, int) and 0 <= refused < len(cases):
                self.outcomes[(template.name, cases[refused])] = error
                self._build(template, cases[:refused] + cases[refused + 1 :])
            else:  # the error names no record: each case on its own
                for case in cases:
                    self._build(template, [case])
            return
        examples = examples_by_record(module)
        for index, case in enumerate(cases):
            self.outcomes[(template.name, case)] = (
                (module, examples[index]) if index in examples else AssertionError(f"{case}: record skipped")
            )

    @staticmethod
    def setup(template: Template, case: str, rows: list[dict]) -> ChatDataModule:
        module = ChatDataModule(train=rows, max_length=4096, shuffle=False, **data_module_options(template, case))
        module.setup("fit")
        return module


@pytest.fixture(scope="session")
def chat_examples() -> ChatExamples:
    return ChatExamples()


def span_texts(tokenizer, input_ids: list[int], positions: list[tuple[int, int]]) -> list[str]:
    """The text of each [start, end) token span, decoded in context: the decoding of the tokens up
    to `end` minus that of the tokens before `start` (SentencePiece decoders drop a leading space
    only at the very start, and byte-level pieces may only form characters together)."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    texts = []
    for start, end in positions:
        before, through = decode(input_ids[:start]), decode(input_ids[:end])
        assert through.startswith(before), f"decoding is not prefix-stable at token {start}"
        texts.append(through[len(before):])
    return texts


def supervised_positions(input_ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """The [start, end) runs of supervised positions; a supervised label is always the token itself."""
    for position, (token, label) in enumerate(zip(input_ids, labels, strict=True)):
        assert label in (IGNORE_INDEX, token), f"label {label} at position {position} is neither the token nor ignored"
    runs, start = [], None
    for position, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    return runs


def supervised_texts(tokenizer, example: dict) -> list[str]:
    input_ids, labels = list(example["input_ids"]), list(example["labels"])
    return span_texts(tokenizer, input_ids, supervised_positions(input_ids, labels))
