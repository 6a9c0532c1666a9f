"""The bundled tokenizer, base model and `plpost:` names: everything loads offline and behaves."""

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plpost.assets import ASSETS_DIR, bundled_names, resolve_pretrained

SPECIAL_IDS = {"<pad>": 0, "<|bos|>": 1, "<|end|>": 2, "<|user|>": 3, "<|assistant|>": 4, "<|system|>": 5, "<|tool|>": 6}


@cache
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_pretrained("plpost:tiny"), local_files_only=True)


@cache
def model():
    return AutoModelForCausalLM.from_pretrained(resolve_pretrained("plpost:tiny"), local_files_only=True).eval()


# -- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_vocabulary_and_special_tokens():
    tok = tokenizer()
    assert len(tok) == 7 + 256  # the special tokens, then one token per byte
    assert tok.convert_tokens_to_ids(list(SPECIAL_IDS)) == list(SPECIAL_IDS.values())
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.eos_token, tok.bos_token) == ("<|end|>", "<|bos|>")
    assert sorted(tok.all_special_ids) == sorted(SPECIAL_IDS.values())


@pytest.mark.parametrize(
    "text",
    [
        "37+48=85",
        "emoji 🎉👩‍👩‍👧 flags 🇫🇷",
        "RTL: שלום עולם، مرحبا بالعالم",
        "NUL\x00 and control \x01\x7f bytes",
        "combining é (e + U+0301), CJK 漢字, ZWJ\u200d",
        "  leading, trailing and double  spaces  \r\n\ttabs ",
        "no cleanup: a . b , c 's n't",
        "",
    ],
)
def test_any_text_round_trips_byte_for_byte(text):
    tok = tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # no merges: one token per byte
    assert tok.decode(ids) == text


def test_each_digit_is_its_own_token_and_no_bos_is_added():
    tok = tokenizer()
    ids = tok("1234567890")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("1234567890")


def test_chat_template_renders_the_compact_format():
    rendered = tokenizer().apply_chat_template(
        [{"role": "user", "content": "37+48"}, {"role": "assistant", "content": "85"}], tokenize=False
    )
    assert rendered == "<|user|>37+48<|end|><|assistant|>85<|end|>"


def test_chat_template_rejects_unknown_roles():
    with pytest.raises(Exception, match="asistant"):
        tokenizer().apply_chat_template([{"role": "asistant", "content": "85"}], tokenize=False)


def test_assistant_mask_covers_exactly_assistant_contents_and_their_end_tokens():
    conversation = [
        {"role": "system", "content": "Add the numbers."},
        {"role": "user", "content": "37+48"},
        {"role": "assistant", "content": "85 🎉"},
        {"role": "tool", "content": "checked: 85"},
        {"role": "user", "content": "21+34"},
        {"role": "assistant", "content": "55"},
    ]
    tok = tokenizer()
    out = tok.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "85 🎉<|end|>55<|end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|system|>Add the numbers.<|end|><|user|>37+48<|end|><|assistant|>"
        "<|tool|>checked: 85<|end|><|user|>21+34<|end|><|assistant|>"
    )


def test_generation_prompt_is_a_token_prefix_of_the_full_conversation():
    tok = tokenizer()
    prompt = [{"role": "user", "content": "37+48"}]
    full = [*prompt, {"role": "assistant", "content": "85"}]
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    full_ids = tok.apply_chat_template(full, return_dict=True)["input_ids"]
    assert tok.decode(prompt_ids) == "<|user|>37+48<|end|><|assistant|>"
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert tok.decode(full_ids[len(prompt_ids) :]) == "85<|end|>"


# -- base model ------------------------------------------------------------------------------


def test_bundled_model_is_a_tiny_llama_matching_the_tokenizer():
    m = model()
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.config.vocab_size == len(tokenizer())
    assert m.config.tie_word_embeddings
    assert 0.5e6 < sum(p.numel() for p in m.parameters()) < 1.5e6
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert (m.generation_config.eos_token_id, m.generation_config.pad_token_id) == (2, 0)


def test_bundled_model_generates_and_continues_number_text():
    """Pretraining taught counting, so greedy decoding continues "12 13 14" with " 15"."""
    tok, m = tokenizer(), model()
    ids = tok("12 13 14", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" 15")


def test_bundled_model_does_not_yet_answer_chat_prompts():
    """The base model never saw the chat format or an addition result, leaving SFT work to do."""
    tok, m = tokenizer(), model()
    path = resolve_pretrained("plpost:data/addition/eval.jsonl")
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()][:100]
    prompts = [tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in rows]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = m.generate(**batch, max_new_tokens=4, do_sample=False)
    completions = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = sum(completion.strip() == row["answer"] for completion, row in zip(completions, rows))
    assert correct <= 5


# -- plpost: names ---------------------------------------------------------------------------


def test_resolve_pretrained_finds_bundled_folder_and_files():
    tiny = Path(resolve_pretrained("plpost:tiny"))
    assert tiny == ASSETS_DIR / "tiny"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in tiny.iterdir()
    }
    sft = Path(resolve_pretrained("plpost:data/addition/sft.jsonl"))
    assert sft.is_file() and sft == ASSETS_DIR / "data" / "addition" / "sft.jsonl"
    assert "plpost:tiny" in bundled_names() and "plpost:data/addition/eval.jsonl" in bundled_names()


def test_bundled_data_files_and_their_row_counts():
    rows = {
        "plpost:data/addition/sft.jsonl": 20_000,
        "plpost:data/addition/preference.jsonl": 6_000,
        "plpost:data/addition/prompts.jsonl": 4_000,
        "plpost:data/addition/eval.jsonl": 300,
        "plpost:data/calculator/sft.jsonl": 4_000,
    }
    assert [name for name in bundled_names() if name.startswith("plpost:data/")] == sorted(rows)
    for name, count in rows.items():
        assert len(Path(resolve_pretrained(name)).read_text(encoding="utf-8").splitlines()) == count, name


@pytest.mark.parametrize("name", ["gpt2", "Qwen/Qwen2.5-0.5B", "/some/local/dir", "data/addition/sft.jsonl", ""])
def test_resolve_pretrained_passes_other_names_through(name):
    assert resolve_pretrained(name) == name


@pytest.mark.parametrize("name", ["plpost:huge", "plpost:data/addition/missing.jsonl", "plpost:../assets/__init__.py"])
def test_resolve_pretrained_names_the_bundled_assets_for_an_unknown_name(name):
    with pytest.raises(FileNotFoundError, match="plpost:tiny") as error:
        resolve_pretrained(name)
    assert name in str(error.value) and "plpost:data/addition/sft.jsonl" in str(error.value)
