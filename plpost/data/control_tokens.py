"""Message text is text: a control token's spelling written inside a message stays text.

A tokenizer turns every occurrence of a special token's spelling (``<|im_end|>``, ``</s>``,
``<|end|>``) into that control token, wherever it stands in the string it is given. A chat about
chat formats, or a message written to inject one, would then close a turn mid-answer, and the
model would be trained to emit the control token there. Only the markers the chat template writes
are control tokens; the same spelling inside a message field (content, reasoning, tool calls, tool
schemas) is tokenized as the text it is.

The template's own markers are told apart by rendering the conversation a second time with each
spelling inside the messages replaced by a placeholder of the same length: what is left in that
rendering is the template's. Those markers are then renamed to aliases of the same length that a
copy of the tokenizer knows as its special tokens (same ids), the placeholders are given their
text back, and the copy tokenizes the whole rendering at once. Every replacement keeps the length,
so the character offsets are those of the original rendering, and the text around each marker is
split exactly as the tokenizer splits it at a control token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

ALIAS_BASE, PLACEHOLDER_BASE = 0xF0000, 0x100000  # Unicode's two supplementary private use planes


class ControlTokens:
    """The special tokens of a tokenizer, and the tokenization that keeps their spellings in messages as text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        spellings = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        self.spellings = sorted((s for s in spellings if s), key=lambda s: (-len(s), s))
        self.prefixes = {spelling[:2] for spelling in self.spellings}
        self.alias = {s: chr(ALIAS_BASE + i) * len(s) for i, s in enumerate(self.spellings)}
        self.placeholder = {s: chr(PLACEHOLDER_BASE + i) * len(s) for i, s in enumerate(self.spellings)}
        self.spelling_of = {placeholder: s for s, placeholder in self.placeholder.items()}
        self.pattern = re.compile("|".join(map(re.escape, self.spellings))) if self.spellings else None
        self.placeholder_pattern = re.compile("|".join(map(re.escape, self.spelling_of))) if self.spellings else None

    def written_in(self, value: Any) -> bool:
        """Whether any string in `value` (messages, tools: nested lists and mappings) holds a spelling."""
        if self.pattern is None:
            return False
        if isinstance(value, str):
            return any(prefix in value for prefix in self.prefixes) and self.pattern.search(value) is not None
        if isinstance(value, Mapping):
            return any(self.written_in(item) for item in value.values())
        if isinstance(value, (list, tuple)):
            return any(self.written_in(item) for item in value)
        return False

    def defused(self, value: Any) -> Any:
        """`value` with every spelling in its strings replaced by its placeholder."""
        if isinstance(value, str):
            return self.pattern.sub(lambda found: self.placeholder[found.group()], value)
        if isinstance(value, Mapping):
            return {key: self.defused(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.defused(item) for item in value]
        return value

    def restored(self, text: str) -> str:
        """A rendering of defused messages with their spellings back: the original rendering."""
        return self.placeholder_pattern.sub(lambda found: self.spelling_of[found.group()], text)

    @cached_property
    def aliased(self) -> Tokenizer:
        """A copy of the tokenizer whose special tokens are spelled as their aliases (same ids and options)."""
        if not self.tokenizer.is_fast:
            raise ValueError(
                f"{type(self.tokenizer).__name__} is not a fast tokenizer: keeping a control token's spelling in a "
                "message as text needs the tokenizer's definition, which only fast (Rust) tokenizers give"
            )
        definition = json.loads(self.tokenizer.backend_tokenizer.to_str())
        for token in definition["added_tokens"]:
            if token["special"] and token["content"] in self.alias:
                token["content"] = self.alias[token["content"]]
        return Tokenizer.from_str(json.dumps(definition))

    @cached_property
    def original_ids(self) -> dict[int, int]:
        """Alias token id -> the special token's id (a tokenizer may number an added token anew)."""
        return {self.aliased.token_to_id(alias): self.tokenizer.convert_tokens_to_ids(spelling)
                for spelling, alias in self.alias.items()}

    def encode(self, defused_text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and offsets of the original rendering, given its defused rendering: the template's
        markers as control tokens, the spellings inside messages as text."""
        marked = self.pattern.sub(lambda found: self.alias[found.group()], defused_text)
        encoding = self.aliased.encode(self.restored(marked), add_special_tokens=False)
        ids = [self.original_ids.get(token, token) for token in encoding.ids]
        return ids, [tuple(offset) for offset in encoding.offsets]
