"""The settings of the trained model that every stage takes, as typed objects: `ModelSettings`
(how the policy loads and trains) and `LoraSettings` (its adapters). A new setting is one field
here, and every stage, its LightningCLI schema and `--print_config` have it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from plpost.hf import QuantizationSettings

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class LoraSettings:
    """LoRA adapters through `peft` (see `peft.LoraConfig` for the meaning of each field).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by alpha / r, or alpha / sqrt(r) with rslora).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
        modules_to_save: modules trained in full and saved with the adapter (e.g. a score head).
        use_rslora: rank-stabilised scaling.
        use_dora: weight-decomposed adapters (DoRA).
        merge_on_export: write merged full weights on export instead of an adapter folder.
        bias: which biases to train ("none", "all", "lora_only").
        extra: any other `peft.LoraConfig` field by name (e.g. ``{layers_to_transform: [0, 1]}``),
            so new peft options need no plpost release.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    merge_on_export: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def peft_config(self, task_type: str):
        from peft import LoraConfig

        settings = asdict(self)
        extra = settings.pop("extra")
        settings.pop("merge_on_export")
        settings["lora_alpha"] = settings.pop("alpha")
        settings["lora_dropout"] = settings.pop("dropout")
        return LoraConfig(task_type=task_type, **settings, **extra)


@dataclass
class ModelSettings:
    """How a stage loads and trains its model (the policy, and a PPO critic): the same fields for
    every stage. Frozen models (references, teachers) load with `dtype`, `attn_implementation`
    and `trust_remote_code` too, and are compiled with `torch_compile`.

    Args:
        random_init: build the model from its config with random weights instead of loading them.
        dtype: the weights' dtype outside a Trainer (exporting, chatting). Training, the Trainer's
            `precision` decides (float32 trained weights under `*-mixed`, see `plpost.precision`),
            and a `dtype` that contradicts it is refused.
        attn_implementation: "sdpa", "eager", "flash_attention_2", ... (default: transformers' choice).
        trust_remote_code: allow model code from the model's repository (off: it runs arbitrary code).
        lora: train LoRA adapters instead of all weights.
        quantization: the base weights in 4 (or 8) bits through bitsandbytes, under `lora` (QLoRA;
            see `plpost.hf.QuantizationSettings`); frozen copies (references, teachers) load unquantized.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        torch_compile: compile the forwards each step runs (the policy's, a frozen copy's, a
            critic's) with `torch.compile`, for faster steps; sampling stays eager. The first step
            pays for the compile (about 30 s for the tiny model on a CPU, more for larger ones);
            shapes are compiled dynamic, so batches of other lengths do not recompile.
            Checkpoints and exports are unchanged.

    Not a frozen dataclass, though it is one default shared by every stage: Lightning copies the
    hyperparameters into checkpoints with `apply_to_collection`, which refuses frozen ones. plpost
    never changes it in place (`dataclasses.replace` makes a changed copy).
    """

    random_init: bool = False
    dtype: Dtype | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    lora: LoraSettings | None = None
    quantization: QuantizationSettings | None = None
    gradient_checkpointing: bool = False
    torch_compile: bool = False

    def __post_init__(self) -> None:
        if self.quantization is not None and self.lora is None:
            raise ValueError("quantization (QLoRA) trains LoRA adapters on frozen quantized weights: give `lora:` too")
        if self.quantization is not None and self.lora.merge_on_export:
            raise ValueError("lora.merge_on_export with quantization would merge into rounded 4-bit weights: export "
                             "the adapter and merge it into the full-precision base model")


MOVED_TO_MODEL_SETTINGS = tuple(ModelSettings.__dataclass_fields__)
"""The stage arguments that `model_settings` holds; given at the top level, they are refused with
their new place named (see `settings_from_flat`)."""


def settings_from_flat(arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` with the `ModelSettings` fields written at the top level (the spelling of stage
    checkpoints before `model_settings` existed) gathered into one `model_settings`, so an older
    checkpoint still exports and chats."""
    moved = {name: arguments[name] for name in MOVED_TO_MODEL_SETTINGS if name in arguments}
    if not moved:
        return arguments
    rest = {name: value for name, value in arguments.items() if name not in moved}
    return {**rest, "model_settings": ModelSettings(**moved)}


# Checkpoints hold the hyperparameters, these settings included, and Lightning reads them back
# with torch.load(weights_only=True) (torch's default), which refuses classes not allowlisted.
torch.serialization.add_safe_globals([LoraSettings, ModelSettings, QuantizationSettings])
