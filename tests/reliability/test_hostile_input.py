"""Hostile input: every malformed record stops setup with plpost's own DataValidationError naming
the source, the record and the field, or is skipped by a stated policy and counted. Unusual but
valid text (emoji, right-to-left scripts, combining marks) is accepted and survives tokenization.

Each record under test is the third of a file whose first two are good, so the error must name
record 2 of that file. Policies decided here (see plpost.data.formats): turns need not
alternate; empty system and tool contents are allowed; overlong records follow `overflow`.
"""

import json
from pathlib import Path

import pytest
from conftest import TINY

from plpost import ChatDataModule, PreferenceDataModule
from plpost.data.formats import DataValidationError
from plpost.hf import load_tokenizer

SYSTEM = {"role": "system", "content": "You add."}
USER = {"role": "user", "content": "1+1"}
ASSISTANT = {"role": "assistant", "content": "2"}
CHAT = {"messages": [SYSTEM, USER, ASSISTANT]}
PROMPT_COMPLETION = {"prompt": "1+1=", "completion": "2"}
PAIR = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "3"}]}
TEXT_PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}

MISSING = object()
WRONG_TYPES = (7, {"text": "x"})  # a number and an object where a string or list belongs


def replaced(row: dict, path: tuple, value) -> dict:
    """A deep copy of `row` with the value at `path` (keys and list positions) replaced or, for MISSING, removed."""
    row = json.loads(json.dumps(row))
    parent = row
    for key in path[:-1]:
        parent = parent[key]
    if value is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return row


def field_name(path: tuple) -> str:
    """("messages", 1, "role") -> 'messages[1].role', the way errors name fields."""
    name = str(path[0])
    for key in path[1:]:
        name += f"[{key}]" if isinstance(key, int) else f".{key}"
    return name


def field_cases(good: dict, fields: dict[tuple, object]) -> list:
    """For each field: missing, each wrong type, and its empty value; the error must name it."""
    cases = []
    for path, empty in fields.items():
        variants = [("missing", MISSING), *((f"type-{type(v).__name__}", v) for v in WRONG_TYPES), ("empty", empty)]
        for label, value in variants:
            cases.append(pytest.param(replaced(good, path, value), field_name(path), id=f"{field_name(path)}-{label}"))
    return cases


CHAT_FIELDS = field_cases(CHAT, {
    ("messages",): [], ("messages", 1, "role"): "", ("messages", 1, "content"): " \n",
    ("messages", 2, "role"): "", ("messages", 2, "content"): "",
}) + field_cases(PROMPT_COMPLETION, {("prompt",): "", ("completion",): " "})

PAIR_FIELDS = field_cases(PAIR, {
    ("prompt", 0, "content"): "", ("chosen",): [], ("chosen", 0, "content"): "", ("rejected",): [],
    ("rejected", 0, "role"): "",
}) + field_cases(TEXT_PAIR, {("chosen",): "", ("rejected",): "  "})


def jsonl_line(row) -> str:
    """UTF-8 text as written; an unpaired surrogate, which UTF-8 cannot hold, as JSON's \\ud800 escape."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(jsonl_line(row) for row in rows), encoding="utf-8")
    return path


def assert_names_record_2(error: DataValidationError, path: Path, field: str | None) -> None:
    message = str(error)
    assert error.source == str(path) and error.record == 2, message
    assert message.startswith(f"{path}, record 2"), message
    if field is not None:
        assert error.field == field and f'field "{field}"' in message, message


@pytest.mark.parametrize(("row", "field"), CHAT_FIELDS)
def test_chat_field_missing_mistyped_or_empty_is_named(tmp_path, row, field):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, PROMPT_COMPLETION, row])
    with pytest.raises(DataValidationError) as error:
        ChatDataModule(TINY, train=str(path)).setup("fit")
    assert_names_record_2(error.value, path, field)


@pytest.mark.parametrize(("row", "field"), PAIR_FIELDS)
def test_preference_field_missing_mistyped_or_empty_is_named(tmp_path, row, field):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, TEXT_PAIR, row])
    with pytest.raises(DataValidationError) as error:
        PreferenceDataModule(TINY, train=str(path)).setup("fit")
    assert_names_record_2(error.value, path, field)


LONG = "x" * 100_000  # a 100 KB line

HOSTILE_CHATS = [
    # (id, row, field named, words of the problem)
    ("unknown-role", {"messages": [{"role": "bot", "content": "hi"}, ASSISTANT]}, "messages[0].role",
     "'bot' is not a role"),
    ("role-not-a-string", {"messages": [{"role": ["user"], "content": "hi"}, ASSISTANT]}, "messages[0].role",
     "is not a role"),
    ("no-assistant-turn", {"messages": [SYSTEM, USER]}, "messages", "no supervised assistant turn"),
    ("nul", {"messages": [USER, {"role": "assistant", "content": "2\x00"}]}, "messages[1].content", "NUL"),
    ("unpaired-surrogate", {"messages": [{"role": "user", "content": "1+1\ud800"}, ASSISTANT]}, "messages[0].content",
     "unpaired surrogate"),
    ("content-image-part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                                          ASSISTANT]}, "messages[0].content[0].type", "cannot be trained on"),
    ("row-is-a-list", [USER, ASSISTANT], None, "expected an object"),
    ("row-is-a-string", "1+1=2", None, "expected an object"),
    ("no-known-field", {"answer": "1+1=2"}, "messages", "expected a 'messages' field"),
    ("completion-role-not-assistant", {"prompt": [USER], "completion": [USER]}, "completion[0].role", "not a role"),
    ("prompt-string-completion-list", {"prompt": "1+1", "completion": [ASSISTANT]}, "completion", "both be strings"),
]

HOSTILE_PAIRS = [
    ("chosen-equals-rejected", {**PAIR, "rejected": PAIR["chosen"]}, "rejected", "identical to chosen"),
    ("unknown-role", {**PAIR, "prompt": [{"role": "human", "content": "1+1"}]}, "prompt[0].role",
     "'human' is not a role"),
    ("prompt-ends-with-assistant", {**PAIR, "prompt": [USER, ASSISTANT]}, "prompt", "ends with an assistant turn"),
    ("nul", {**TEXT_PAIR, "chosen": "2\x00"}, "chosen", "NUL"),
    ("unpaired-surrogate", {**TEXT_PAIR, "prompt": "\udfff1+1"}, "prompt", "unpaired surrogate"),
    ("margin-bool", {**PAIR, "margin": True}, "margin", "expected a number"),
    ("margin-string", {**PAIR, "margin": "1.0"}, "margin", "expected a number"),
    ("margin-infinite", {**PAIR, "margin": float("inf")}, "margin", "not a finite number"),
    ("implicit-prompt-shares-nothing", {"chosen": "2", "rejected": "3"}, "prompt", "share no leading text"),
    ("mixed-strings-and-messages", {**PAIR, "chosen": "2"}, "chosen", "all be strings or all be message lists"),
    ("row-is-a-number", 7, None, "expected an object"),
]


@pytest.mark.parametrize(("row", "field", "problem"), [pytest.param(*case[1:], id=case[0]) for case in HOSTILE_CHATS])
def test_hostile_chat_record_is_named(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT, row])
    with pytest.raises(DataValidationError) as error:
        ChatDataModule(TINY, train=str(path)).setup("fit")
    assert_names_record_2(error.value, path, field)
    assert problem in str(error.value)


@pytest.mark.parametrize(("row", "field", "problem"), [pytest.param(*case[1:], id=case[0]) for case in HOSTILE_PAIRS])
def test_hostile_preference_record_is_named(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, PAIR, row])
    with pytest.raises(DataValidationError) as error:
        PreferenceDataModule(TINY, train=str(path)).setup("fit")
    assert_names_record_2(error.value, path, field)
    assert problem in str(error.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_bytes_that_are_not_utf8_are_named(tmp_path, suffix):
    path = tmp_path / f"chat{suffix}"
    good = json.dumps(CHAT).encode()
    body = {
        ".jsonl": good + b"\n" + good + b'\n{"messages": "\xff\xfe"}\n',
        ".json": b"[" + good + b', {"messages": "\xc3\x28"}]',
        ".csv": b"prompt,completion\n1+1=,2\n2+2=,\xe2\x82\n",
    }[suffix]
    path.write_bytes(body)
    with pytest.raises(DataValidationError, match="not valid UTF-8") as error:
        ChatDataModule(TINY, train=str(path)).setup("fit")
    assert error.value.source == str(path)
    if suffix == ".jsonl":
        assert error.value.record == 2 and "line 3" in str(error.value)


@pytest.mark.parametrize(("name", "body"), [
    ("empty.jsonl", ""), ("blank-lines.jsonl", "\n\n  \n"), ("empty-array.json", "[]"),
    ("header-only.csv", "prompt,completion\n"),
])
def test_empty_files_are_refused(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(DataValidationError, match="the file is empty|has no rows") as error:
        ChatDataModule(TINY, train=str(path)).setup("fit")
    assert error.value.source == str(path)


def test_nul_byte_between_fields_of_a_jsonl_line_is_not_json(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"messages":\x00 []}\n')
    with pytest.raises(DataValidationError, match=r"record 1: line 2 is not valid JSON"):
        ChatDataModule(TINY, train=str(path)).setup("fit")


# -- overlong records: the `overflow` policy, counted -------------------------------------------
def long_prompt_chat(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [CHAT, {"messages": [{"role": "user", "content": LONG}, ASSISTANT]}])


def test_a_100kb_prompt_is_skipped_and_counted_when_truncating(tmp_path):
    """Its first max_length tokens are all prompt: no supervised token is left, so it is skipped."""
    data = ChatDataModule(TINY, train=str(long_prompt_chat(tmp_path)), max_length=64)
    data.setup("fit")
    assert data.counts["train"] == {"records": 2, "kept": 1, "skipped (no supervised token left after truncation)": 1}
    assert [e["record_index"] for e in data.train_examples] == [0]


def test_a_100kb_prompt_is_dropped_and_counted_or_named_as_the_policy_says(tmp_path):
    path = long_prompt_chat(tmp_path)
    dropping = ChatDataModule(TINY, train=str(path), max_length=64, overflow="drop")
    dropping.setup("fit")
    assert dropping.counts["train"] == {"records": 2, "kept": 1, "dropped (longer than max_length)": 1}
    with pytest.raises(DataValidationError, match=r"record 1: \d+ tokens exceed max_length=64") as error:
        ChatDataModule(TINY, train=str(path), max_length=64, overflow="error").setup("fit")
    assert error.value.source == str(path)


def test_a_100kb_answer_is_truncated_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, {"messages": [USER, {"role": "assistant", "content": LONG}]}])
    data = ChatDataModule(TINY, train=str(path), max_length=64)
    data.setup("fit")
    assert data.counts["train"] == {"records": 2, "kept": 2, "truncated": 1}
    assert max(len(e["input_ids"]) for e in data.train_examples) == 64


def test_a_preference_prompt_longer_than_max_length_is_skipped_counted_or_named(tmp_path):
    long_pair = {**PAIR, "prompt": [{"role": "user", "content": LONG}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, long_pair])
    data = PreferenceDataModule(TINY, train=str(path), max_length=64)
    data.setup("fit")
    skipped = "skipped (a completion has no token left after truncation)"
    assert data.counts["train"] == {"records": 2, "kept": 1, skipped: 1}
    with pytest.raises(DataValidationError, match=r'record 1, field "chosen": prompt \+ chosen is \d+ tokens'):
        PreferenceDataModule(TINY, train=str(path), max_length=64, overflow="error").setup("fit")


def test_identical_pairs_can_be_skipped_and_counted_instead(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, {**PAIR, "rejected": PAIR["chosen"]}])
    data = PreferenceDataModule(TINY, train=str(path), identical_pairs="skip")
    data.setup("fit")
    assert data.counts["train"] == {"records": 2, "kept": 1, "skipped (chosen identical to rejected)": 1}


def test_a_file_of_only_unusable_records_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": LONG}, ASSISTANT]}] * 2)
    with pytest.raises(DataValidationError, match="no record is usable"):
        ChatDataModule(TINY, train=str(path), max_length=64).setup("fit")


# -- turn order: allowed, unless the template refuses it ----------------------------------------
NON_ALTERNATING = [
    [USER, USER, ASSISTANT],
    [ASSISTANT, USER, ASSISTANT],
    [USER, ASSISTANT, ASSISTANT],
    [USER, ASSISTANT, SYSTEM, USER, {"role": "assistant", "content": "4"}],
    [USER, {"role": "tool", "content": ""}, ASSISTANT],
]


@pytest.mark.parametrize("messages", NON_ALTERNATING, ids=lambda m: "-".join(x["role"] for x in m))
def test_turns_need_not_alternate_and_every_assistant_turn_is_supervised(tokenizer, messages):
    data = ChatDataModule(TINY, train=[{"messages": messages}])
    data.setup("fit")
    (example,) = data.train_examples
    supervised = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert supervised == "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")


ALTERNATING_ONLY = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_template_that_refuses_the_turn_order_names_the_record(tmp_path):
    rows = [{"messages": [USER, ASSISTANT]}] * 2 + [{"messages": [USER, USER, ASSISTANT]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataValidationError, match="roles must alternate") as error:
        ChatDataModule(TINY, train=str(path), chat_template=ALTERNATING_ONLY).setup("fit")
    assert_names_record_2(error.value, path, "messages")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, PAIR, {**PAIR, "prompt": [USER, USER]}])
    with pytest.raises(DataValidationError, match="roles must alternate") as error:
        PreferenceDataModule(TINY, train=str(pairs), chat_template=ALTERNATING_ONLY).setup("fit")
    assert_names_record_2(error.value, pairs, "prompt")


def test_an_opening_assistant_turn_is_supervised_without_generation_markers(tmp_path, tokenizer):
    """Each turn is located in the one rendering of the conversation, so an opening assistant turn
    needs nothing before it: its content and end token are supervised, its role header is not."""
    plain = load_tokenizer(TINY).chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [ASSISTANT, USER, ASSISTANT]}])
    data = ChatDataModule(TINY, train=str(path), chat_template=plain)
    data.setup("fit")
    (example,) = data.train_examples
    supervised = [tokenizer.decode([t]) for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert supervised == ["2", "<|end|>", "2", "<|end|>"]


# -- unusual text is accepted and round-trips ---------------------------------------------------
TEXTS = [
    "😀 👩‍👩‍👧 🇫🇷 ✓",  # emoji, a ZWJ family, a flag
    "שלום, עולם!",  # Hebrew (right to left)
    "مرحبا بالعالم ١٢٣",  # Arabic, Arabic-Indic digits
    "\u202eevil\u202c é ﬁ",  # a right-to-left override, a combining accent, a ligature
    "日本語とEnglish",
]


@pytest.mark.parametrize("text", TEXTS)
def test_unusual_text_is_accepted_and_round_trips(tmp_path, tokenizer, text):
    """Through a UTF-8 JSONL file: the decoded tokens are the text as written, for chats and pairs."""
    chat_path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": text},
                                                                    {"role": "assistant", "content": text}]}])
    data = ChatDataModule(TINY, train=str(chat_path))
    data.setup("fit")
    (example,) = data.train_examples
    assert tokenizer.decode(example["input_ids"]) == f"<|user|>{text}<|end|><|assistant|>{text}<|end|>"
    supervised = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(supervised) == f"{text}<|end|>"
    pair_path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": text, "chosen": text, "rejected": text + "!"}])
    pairs = PreferenceDataModule(TINY, train=str(pair_path))
    pairs.setup("fit")
    (pair,) = pairs.train_examples
    assert tokenizer.decode(pair["chosen_ids"]) == f"{text}<|end|>"
    assert tokenizer.decode(pair["rejected_ids"]) == f"{text}!<|end|>"
