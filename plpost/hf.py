"""Loading Hugging Face tokenizers and models by Hub name, local folder or bundled name, in full
precision or with 4-bit / 8-bit base weights through bitsandbytes (QLoRA)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from plpost.assets import resolve_pretrained
from plpost.quiet import folder_bytes, new_head_report_filtered, no_progress_bars_if_small

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizationError(ValueError):
    """A quantized load that cannot work here; the message says what to change."""


@dataclass
class QuantizationSettings:
    """Base weights stored in 4 (or 8) bits by bitsandbytes, trained through LoRA adapters: QLoRA
    (Dettmers et al. 2023). See `transformers.BitsAndBytesConfig` for each field.

    Args:
        bits: 4 (QLoRA: NF4 blocks with double quantization) or 8 (LLM.int8()).
        quant_type: the 4-bit data type, "nf4" (the paper's NormalFloat) or "fp4".
        double_quant: quantize the quantization constants too (saves ~0.4 bits per weight).
        compute_dtype: the dtype the 4-bit matmuls run in (default: the weights' dtype the
            Trainer's precision asks for, float32 when it asks for none).
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def bnb_config(self, dtype: str | None):
        """The `BitsAndBytesConfig` of these settings; `dtype`: the weights' dtype otherwise loaded."""
        from transformers import BitsAndBytesConfig

        if self.bits not in (4, 8):
            raise QuantizationError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = self.compute_dtype or dtype or "float32"
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[compute],
        )


def import_bitsandbytes():
    """bitsandbytes, or a QuantizationError saying how to install it. Its CPU backend tries an optional
    kernel from the Hub at import and warns when it cannot have it (offline); it then uses its own."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as error:
        raise QuantizationError(
            f"quantization (QLoRA) needs bitsandbytes, which does not import here ({error}): "
            f"pip install 'plpost[qlora]'"
        ) from None
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


def check_quantization_device(device: torch.device | str) -> None:
    """Refuses a device bitsandbytes has no backend for (its CPU, CUDA and XPU backends work)."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda", "xpu"):
        raise QuantizationError(f"bitsandbytes has no {kind} backend: quantized (QLoRA) training runs on CPU, CUDA "
                                f"or XPU; leave `quantization` out to train on {kind}")


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
    quantization: QuantizationSettings | None = None,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> PreTrainedModel:
    """`auto_class` (AutoModelForCausalLM, or e.g. AutoModelForSequenceClassification for a reward
    model) from a Hub name or folder; `random_init` builds its config with fresh weights.

    empty: the model built on the meta device, from its config alone (no weight read, no memory
    taken), for `plpost.sharding.shard_from_rank0` to fill with rank 0's weights once sharded.
    quantization: base weights quantized by bitsandbytes as they load, straight onto `device`
    (the quantized layers cannot be built empty nor at random: a sharded or `random_init` model
    is refused).
    config_overrides: config fields to set before the weights load (e.g. num_labels=1).
    """
    path = resolve_pretrained(name_or_path)
    torch_dtype = DTYPES[dtype] if dtype else None
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **config_overrides)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    if quantization is not None and (empty or random_init):
        raise QuantizationError(
            f"{name_or_path}: quantized base weights (QLoRA) are quantized from a checkpoint as they load; they "
            f"cannot be {'sharded from rank 0 (FSDP)' if empty else 'built at random (random_init)'}: leave out "
            f"`quantization`, or {'train on one device or DDP' if empty else 'give a pretrained model'}"
        )
    if empty:
        with torch.device("meta"):
            return auto_class.from_config(config, dtype=torch_dtype or config.dtype, trust_remote_code=trust_remote_code)
    if random_init:
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
        return model.to(torch_dtype) if torch_dtype else model
    quantized: dict[str, Any] = {}
    if quantization is not None:
        import_bitsandbytes()
        check_quantization_device(device)
        quantized = {"quantization_config": quantization.bnb_config(dtype), "device_map": {"": torch.device(device)}}
    # A classifier built on a causal LM (a new reward model or critic) gets a new score head on
    # purpose: transformers' report of it as missing is not printed, any other finding is.
    with new_head_report_filtered("score"), no_progress_bars_if_small(folder_bytes(path)):
        return auto_class.from_pretrained(path, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                          **quantized)


def prepare_quantized_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """A quantized model made ready for LoRA training (peft's `prepare_model_for_kbit_training`):
    base weights frozen, the non-quantized ones (norms, embeddings, head) in float32 for stable
    updates. Gradient checkpointing is left to the stage's own setting."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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
