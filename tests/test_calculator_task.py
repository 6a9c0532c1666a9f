"""The calculator task: the `add` tool, its demonstrations, and the shipped SFT data that mixes
tool calls with direct answers that forget carries."""

import importlib.util
import json
from functools import cache
from pathlib import Path

import pytest
from conftest import TINY, is_tool_demonstration, supervised_spans
from transformers import AutoConfig
from transformers.utils import get_json_schema

from plpost import ChatDataModule
from plpost.assets import resolve_pretrained
from plpost.tasks import AdditionProblem
from plpost.tasks.calculator import (
    CALCULATOR_TOOLS,
    add,
    calculate,
    calculator_tool_schemas,
    direct_demonstration,
    tool_demonstration,
)

SFT = "plpost:data/calculator/sft.jsonl"


@cache
def build_assets():
    """scripts/build_assets.py as a module: its constants are what the shipped file must show."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_assets.py"
    spec = importlib.util.spec_from_file_location("build_assets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def shipped_rows() -> list[dict]:
    return [json.loads(line) for line in Path(resolve_pretrained(SFT)).read_text(encoding="utf-8").splitlines()]


def problem_of(row: dict) -> AdditionProblem:
    a, b = row["messages"][0]["content"].split("+")
    return AdditionProblem(int(a), int(b))


# -- the tool and its demonstrations ---------------------------------------------------------


def test_add_is_a_plain_typed_function_whose_schema_comes_from_its_docstring():
    assert add(37, 48) == 85 and CALCULATOR_TOOLS == [add]
    function = get_json_schema(add)["function"]
    assert function["name"] == "add"
    assert function["parameters"]["required"] == ["a", "b"]
    properties = function["parameters"]["properties"]
    assert {name: spec["type"] for name, spec in properties.items()} == {"a": "integer", "b": "integer"}
    assert all(spec["description"] for spec in properties.values())
    assert calculator_tool_schemas() == [get_json_schema(add)]


def test_a_tool_demonstration_asks_calls_reads_the_result_and_answers_it():
    assert tool_demonstration(AdditionProblem(37, 48)) == [
        {"role": "user", "content": "37+48"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 37, "b": 48}}}]},
        {"role": "tool", "name": "add", "content": "85"},
        {"role": "assistant", "content": "85"},
    ]
    assert direct_demonstration(AdditionProblem(37, 48), "75") == [
        {"role": "user", "content": "37+48"}, {"role": "assistant", "content": "75"},
    ]


# -- the shipped SFT file --------------------------------------------------------------------


def test_shipped_file_is_exactly_what_the_build_writes(tmp_path):
    """Rebuilt from its constants and seeds, byte for byte: the file is reproducible."""
    assets = build_assets()
    eval_problems = assets.sample_problems(assets.EVAL_SIZE, assets.EVAL_SEED, distinct=True)
    assets.build_calculator_data(tmp_path, eval_problems)
    assert (tmp_path / "sft.jsonl").read_bytes() == Path(resolve_pretrained(SFT)).read_bytes()


def test_shipped_counts_and_shares_match_the_build_constants():
    """Half the rows offer the tool and 30% of those call it (an exact count); every other row answers
    directly, and among those exactly 65% of the carry problems show the forgotten carry."""
    assets = build_assets()
    rows = shipped_rows()
    with_tools = [row for row in rows if "tools" in row]
    demonstrations = [row for row in rows if is_tool_demonstration(row)]
    assert len(rows) == assets.CALCULATOR_SFT_SIZE == 4_000
    assert len(with_tools) == assets.CALCULATOR_TOOL_ROWS == 2_000
    assert len(demonstrations) == round(assets.TOOL_DEMONSTRATION_SHARE * len(with_tools)) == 600
    assert all("tools" in row for row in demonstrations)  # the tool is called only where it is offered

    direct_carry = [row for row in rows if not is_tool_demonstration(row) and problem_of(row).has_carry]
    forgotten = [row for row in direct_carry if row["messages"][1]["content"] == problem_of(row).forgotten_carry_answer]
    assert len(forgotten) == round(assets.FORGOTTEN_CARRY_SHARE * len(direct_carry))
    for offered in (True, False):  # both halves show the mistake, not one of them alone
        group = [row for row in direct_carry if ("tools" in row) is offered]
        share = sum(row in forgotten for row in group) / len(group)
        assert share == pytest.approx(assets.FORGOTTEN_CARRY_SHARE, abs=0.05)


def test_shipped_rows_are_right_apart_from_the_forgotten_carries():
    for row in shipped_rows():
        problem = problem_of(row)
        if is_tool_demonstration(row):
            assert row["messages"] == tool_demonstration(problem)
        else:
            (answer,) = [message["content"] for message in row["messages"] if message["role"] == "assistant"]
            assert answer in (problem.answer, problem.forgotten_carry_answer)


def test_shipped_rows_carry_the_schema_of_add_and_no_held_out_problem():
    schemas = [get_json_schema(add)]
    assert all(row["tools"] == schemas for row in shipped_rows() if "tools" in row)
    assert {frozenset(row) for row in shipped_rows()} == {frozenset({"messages"}), frozenset({"messages", "tools"})}
    with open(resolve_pretrained("plpost:data/addition/eval.jsonl"), encoding="utf-8") as handle:
        held_out = {json.loads(line)["prompt"][0]["content"] for line in handle}
    assert not {row["messages"][0]["content"] for row in shipped_rows()} & held_out


# -- the shipped file through the data path --------------------------------------------------


@pytest.fixture(scope="module")
def prepared():
    """Every shipped row tokenized by ChatDataModule; overflow="error" at the tiny model's positions."""
    positions = AutoConfig.from_pretrained(resolve_pretrained(TINY)).max_position_embeddings
    data = ChatDataModule(TINY, train=SFT, max_length=positions, overflow="error", num_proc=1)
    data.setup("fit")
    return data.train_examples


def expected_supervision(row: dict) -> list[str]:
    """Each assistant turn as the model must write it: content, then each call, then <|end|>."""
    texts = []
    for message in row["messages"]:
        if message["role"] == "assistant":
            calls = [call["function"] for call in message.get("tool_calls", [])]
            written = [f'<call>{{"name": "{call["name"]}", "arguments": {json.dumps(call["arguments"])}}}</call>' for call in calls]
            texts.append(message["content"] + "".join(written) + "<|end|>")
    return texts


def test_every_row_trains_exactly_its_assistant_turns_calls_and_end_tokens(prepared, tokenizer):
    """The tool list, user turns, role headers and tool results are context; the calls are supervised."""
    assert len(prepared) == len(shipped_rows())  # nothing dropped or cut
    for example in prepared:
        row = shipped_rows()[example["record_index"]]
        spans = supervised_spans(example["input_ids"], example["labels"])
        assert [tokenizer.decode(span) for span in spans] == expected_supervision(row)
        assert all(label in (-100, token) for token, label in zip(example["input_ids"], example["labels"]))
        opening = "<|system|>tools: add<|end|><|user|>" if "tools" in row else "<|user|>"
        assert tokenizer.decode(example["input_ids"]).startswith(opening)


def test_the_longest_row_fits_the_tiny_model_positions(prepared):
    """A tool demonstration is the longest row, well inside the 256 positions."""
    longest = max(prepared, key=lambda example: len(example["input_ids"]))
    assert is_tool_demonstration(shipped_rows()[longest["record_index"]])
    assert len(longest["input_ids"]) < AutoConfig.from_pretrained(resolve_pretrained(TINY)).max_position_embeddings == 256


@pytest.mark.parametrize("expression, value", [("(12 + 30) * 4 / 3", "56"), ("7 / 2", "3.5"), ("-2 ** 3", "-8"),
                                               ("17 // 5 + 17 % 5", "5")])
def test_calculate_evaluates_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, problem", [("__import__('os')", "not arithmetic"), ("9 ** 9 ** 9", "exponents"),
                                                 ("x + 1", "not arithmetic")])
def test_calculate_refuses_what_is_not_arithmetic(expression, problem):
    with pytest.raises(ValueError, match=problem):
        calculate(expression)


def test_calculate_has_a_schema():
    assert get_json_schema(calculate)["function"]["parameters"]["properties"]["expression"]["type"] == "string"
