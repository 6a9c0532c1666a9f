"""FeedbackDataModule: unpaired rows, pairs converted, validation, the mismatched completions, batches."""

import pytest
from conftest import TINY

from plpost.data.feedback import FeedbackDataModule
from plpost.data.formats import DataValidationError
from plpost.data.preference import PreferenceDataModule

PAIR = {"prompt": [{"role": "user", "content": "12+9"}], "chosen": [{"role": "assistant", "content": "21"}],
        "rejected": [{"role": "assistant", "content": "11"}]}


def examples_of(rows, **settings):
    data = FeedbackDataModule(TINY, train=rows, shuffle=False, **settings)
    data.setup("fit")
    return data, data.train_examples


def test_a_pair_gives_a_desirable_and_an_undesirable_row_tokenized_as_the_pair_is():
    """The converted pair and the two unpaired rows written out by hand give the same examples,
    with the prompt and completion tokens PreferenceDataModule gives the pair."""
    unpaired = [{"prompt": PAIR["prompt"], "completion": PAIR[side], "label": side == "chosen"}
                for side in ("chosen", "rejected")]
    other = {"prompt": "3+4", "completion": "7", "label": True}
    _, converted = examples_of([PAIR, other])
    _, written = examples_of([*unpaired, other])
    strip = lambda examples: [{k: e[k] for k in ("prompt_ids", "completion_ids", "desirable")} for e in examples]  # noqa: E731
    assert strip(converted) == strip(written)
    pairs = PreferenceDataModule(TINY, train=[PAIR])
    pairs.setup("fit")
    (pair,) = pairs.train_examples
    assert [e["desirable"] for e in converted] == [True, False, True]
    assert converted[0]["prompt_ids"] == converted[1]["prompt_ids"] == pair["prompt_ids"]
    assert (converted[0]["completion_ids"], converted[1]["completion_ids"]) == (pair["chosen_ids"], pair["rejected_ids"])


def test_mismatched_completion_is_the_next_one_of_another_prompt():
    """Source order: pair A (2 rows), pair B (2 rows), row C. Each row takes the completion of the
    next row with another prompt, wrapping around: A's rows both take B's chosen, B's rows C's
    completion, C takes A's chosen; the two halves of a pair never mismatch each other."""
    b = {**PAIR, "prompt": [{"role": "user", "content": "5+5"}]}
    c = {"prompt": [{"role": "user", "content": "1+1"}], "completion": [{"role": "assistant", "content": "2"}],
         "label": False}
    _, examples = examples_of([PAIR, b, c])
    partner = [2, 2, 4, 4, 0]  # the position whose completion each example takes
    assert [e["mismatched_ids"] for e in examples] == [examples[p]["completion_ids"] for p in partner]
    assert [e["example_index"] for e in examples] == list(range(5))


def test_mismatched_completion_is_cut_to_max_length():
    long_answer = {"prompt": "1+1", "completion": "2 " * 20, "label": True}
    data, examples = examples_of([{"prompt": "9+9+9+9+9", "completion": "45", "label": True}, long_answer],
                                 max_length=24)
    assert len(examples[0]["prompt_ids"]) + len(examples[0]["mismatched_ids"]) == 24
    assert examples[0]["mismatched_ids"] == examples[1]["completion_ids"][: 24 - len(examples[0]["prompt_ids"])]


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": "1+1", "completion": "2", "label": "yes"}, "label", "expected true or false"),
        ({"prompt": "1+1", "completion": "2", "label": 1}, "label", "expected true or false"),
        ({"prompt": "1+1", "completion": "2"}, "label", "is missing"),
        ({"prompt": "1+1", "label": True}, "completion", "is missing"),
        ({"prompt": "1+1", "completion": [{"role": "assistant", "content": "2"}], "label": True}, "completion",
         "both be strings or both be message lists"),
        ({"prompt": [{"role": "assistant", "content": "2"}], "completion": [{"role": "assistant", "content": "2"}],
          "label": True}, "prompt", "ends with an assistant turn"),
        ({**PAIR, "rejected": PAIR["chosen"]}, "rejected", "identical to chosen"),
    ],
)
def test_bad_rows_fail_naming_record_and_field(row, field, problem):
    with pytest.raises(DataValidationError, match=problem) as error:
        examples_of([{"prompt": "1+1", "completion": "2", "label": True}, row])
    assert (error.value.source, error.value.record, error.value.field) == ("in-memory rows", 1, field)


def test_csv_labels_are_text(tmp_path):
    path = tmp_path / "feedback.csv"
    path.write_text("prompt,completion,label\n1+1,2,true\n2+2,5,False\n")
    _, examples = examples_of(str(path))
    assert [e["desirable"] for e in examples] == [True, False]


def test_a_split_with_one_prompt_has_no_mismatch_and_is_refused():
    with pytest.raises(DataValidationError, match="same prompt"):
        examples_of([PAIR])


def test_batches_hold_both_row_sets_and_the_step_normalizer():
    data, examples = examples_of([PAIR, {"prompt": "3+4", "completion": "7", "label": True}])
    batch = data.collate_fn()([(e, None) for e in examples])
    assert batch.desirable.tolist() == [True, False, True] and batch.example_index.tolist() == [0, 1, 2]
    assert batch.record_index.tolist() == [0, 0, 1]  # the two rows of the pair come from record 0
    assert float(batch.example_normalizer) == 3.0
    assert float(data.collate_fn()([(e, 8.0) for e in examples[:2]]).example_normalizer) == 8.0
    for rows, key in ((batch.completions, "completion_ids"), (batch.mismatched, "mismatched_ids")):
        for row, labels, example in zip(rows.input_ids, rows.labels, examples):
            real = rows.attention_mask[0].new_tensor(example["prompt_ids"] + example[key])
            assert row[: len(real)].tolist() == real.tolist()
            assert labels[len(example["prompt_ids"]) : len(real)].tolist() == example[key]
