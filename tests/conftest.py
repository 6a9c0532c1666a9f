import os

# Tests run offline: nothing may reach the Hub or W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForSequenceClassification  # noqa: E402

from plpost.hf import load_tokenizer  # noqa: E402

TINY = "plpost:tiny"


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="session")
def pad_is_eos_tokenizer_dir(tmp_path_factory):
    """The bundled tokenizer saved with pad == eos, as many instruct tokenizers ship."""
    tokenizer = load_tokenizer(TINY)
    tokenizer.pad_token = tokenizer.eos_token
    path = tmp_path_factory.mktemp("pad-is-eos")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised AutoModelForSequenceClassification saved as RewardModule exports one."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def chat(*turns: str) -> list[dict]:
    """Alternating user/assistant messages from their contents."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def supervised_spans(input_ids, labels) -> list[list[int]]:
    """The runs of consecutive supervised tokens."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans
