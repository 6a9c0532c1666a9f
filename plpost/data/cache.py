"""Where tokenized data is kept, and the key that says which inputs made it.

A data module's examples are written once into a cache entry, a folder named by a key that hashes
everything the examples depend on: the source's content, the tokenizer (its vocabulary, added
tokens and chat template), the module's class and preprocessing settings (max_length, overflow
policy, template kwargs, ...), and DATA_FORMAT_VERSION. Any change of one of them is another key,
so an entry is never reused for inputs that would give other examples, and is never rewritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xxhash
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

# Raised whenever what preprocessing writes changes (a column, a rule of tokenization, a check),
# so entries written by an earlier plpost are not read as if this one had written them.
DATA_FORMAT_VERSION = 2
CACHE_ENV = "PLPOST_DATA_CACHE"
_announced: set[Path] = set()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $PLPOST_DATA_CACHE, else ~/.cache/plpost/data; printed the first time a process uses it."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "plpost" / "data").expanduser()
    if root not in _announced:
        _announced.add(root)
        rank_zero_info(f"plpost keeps tokenized data in {root} (set cache_dir or ${CACHE_ENV} to move it)")
    return root


def digest(*parts: bytes | str) -> str:
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
    return hasher.hexdigest()


def file_digest(path: Path) -> str:
    """A hash of the file's bytes (a renamed or touched file with the same bytes keeps its entry)."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            hasher.update(chunk)
    return hasher.hexdigest()


def rows_digest(rows: list) -> str:
    """A hash of in-memory rows, as their JSON text (types included: a CSV cell and a number differ)."""
    return digest(json.dumps(rows, ensure_ascii=False, default=repr))


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What a tokenizer's output depends on: its class, vocabulary, merges, normalizer and added tokens
    (the backend's whole definition), special tokens and chat template."""
    if tokenizer.is_fast:
        backend = tokenizer.backend_tokenizer.to_str()
    else:
        backend = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "backend": digest(backend),
        "added_tokens": {str(token_id): str(token) for token_id, token in tokenizer.added_tokens_decoder.items()},
        "special_tokens": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "chat_template": tokenizer.chat_template,
    }


def entry_key(settings: Mapping[str, Any]) -> str:
    """The key of the entry made from `settings` (JSON-able: source fingerprint, tokenizer identity, options)."""
    return digest(json.dumps({"format": DATA_FORMAT_VERSION, **settings}, sort_keys=True, default=repr))
