"""Loading Hugging Face tokenizers and models by Hub name, local folder or bundled name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from plpost.assets import resolve_pretrained
from plpost.quiet import folder_bytes, new_head_report_filtered, no_progress_bars_if_small

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(
    name_or_path: str, *, chat_template: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer, with `chat_template` (a Jinja string or a .jinja file) replacing its own if given.

    A tokenizer without a pad token pads with EOS; every mask in plpost comes from the data,
    never from comparing ids with the pad id, so a supervised EOS stays supervised.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path), trust_remote_code=trust_remote_code)
    if chat_template is not None:
        template_file = Path(chat_template)
        is_file = template_file.suffix in (".jinja", ".j2") and template_file.is_file()
        tokenizer.chat_template = template_file.read_text() if is_file else chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    random_init: bool = False,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    auto_class: type = AutoModelForCausalLM,
    empty: bool = False,
    **config_overrides: Any,
) -> PreTrainedModel:
    """`auto_class` (AutoModelForCausalLM, or e.g. AutoModelForSequenceClassification for a reward
    model) from a Hub name or folder; `random_init` builds its config with fresh weights.

    empty: the model built on the meta device, from its config alone (no weight read, no memory
    taken), for `plpost.sharding.shard_from_rank0` to fill with rank 0's weights once sharded.
    config_overrides: config fields to set before the weights load (e.g. num_labels=1).
    """
    path = resolve_pretrained(name_or_path)
    torch_dtype = DTYPES[dtype] if dtype else None
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **config_overrides)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    if empty:
        with torch.device("meta"):
            return auto_class.from_config(config, dtype=torch_dtype or config.dtype, trust_remote_code=trust_remote_code)
    if random_init:
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
        return model.to(torch_dtype) if torch_dtype else model
    # A classifier built on a causal LM (a new reward model or critic) gets a new score head on
    # purpose: transformers' report of it as missing is not printed, any other finding is.
    with new_head_report_filtered("score"), no_progress_bars_if_small(folder_bytes(path)):
        return auto_class.from_pretrained(path, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code)


def check_vocabulary_fits(
    tokenizer: PreTrainedTokenizerBase, tokenizer_name: str, model: PreTrainedModel, model_name: str
) -> None:
    """Raises ValueError when the tokenizer has ids the model has no embedding row for (another
    model's tokenizer), which would otherwise fail deep inside the first forward."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer {tokenizer_name} has {len(tokenizer)} tokens but the model {model_name} embeds only "
            f"{rows}: give the model's own tokenizer (tokenizer: {model_name})"
        )


def check_same_tokenizer(
    tokenizer: PreTrainedTokenizerBase, tokenizer_name: str, other_name: str, *, trust_remote_code: bool = False
) -> None:
    """Raises ValueError unless the tokenizer of `other_name` (a model folder or Hub name) maps every
    token to the same id as `tokenizer`: two models compared position by position over their
    vocabularies (a distillation teacher and its student) must read the same ids as the same tokens."""
    other = load_tokenizer(other_name, trust_remote_code=trust_remote_code)
    if other.get_vocab() != tokenizer.get_vocab():
        mine, theirs = tokenizer.get_vocab(), other.get_vocab()
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        raise ValueError(
            f"{other_name} has another tokenizer than {tokenizer_name} ({len(theirs)} against {len(mine)} tokens; "
            f"e.g. {differ}): the teacher's and the student's distributions are compared token by token, so they "
            f"need one vocabulary: take a teacher of the student's family, or train the student with SFT on the "
            f"teacher's generated answers instead"
        )
