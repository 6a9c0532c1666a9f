"""plpost as a user runs it: its LightningModule and DataModule under a plain `L.Trainer`, logger off."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L

from benchmarks.frameworks import DPO_BETA, adamw, attention_implementation
from benchmarks.measure import StepClock, matmul_parameters
from benchmarks.presets import Preset
from plpost.data.chat import ChatDataModule
from plpost.data.preference import PreferenceDataModule
from plpost.modules import ModelSettings
from plpost.modules.dpo import DPOModule
from plpost.modules.reward import RewardModule
from plpost.modules.sft import SFTModule

PRECISION = {"fp32": "32-true", "bf16-mixed": "bf16-mixed"}


class ClockCallback(L.Callback):
    """Counts each batch as it starts and reads the clock after its optimizer step."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.batch(batch.input_ids, batch.attention_mask)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.step_end()


def build(stage: str, variant: str, preset: Preset, model_dir: str, rows: list[dict], workdir: Path):
    loading = ModelSettings(dtype="float32", attn_implementation=attention_implementation())
    common = dict(model_settings=loading, optimizer=adamw(preset))
    data = dict(tokenizer=model_dir, train=rows, batch_size=preset.batch_size, max_length=preset.max_length,
                shuffle=False, seed=preset.seed)
    if stage == "sft":
        settings = replace(loading, gradient_checkpointing=variant == "checkpointed", torch_compile=variant == "compiled")
        module = SFTModule(model_dir, model_settings=settings, optimizer=adamw(preset))
        return module, ChatDataModule(**data, packing=variant == "padding-free")
    if stage == "reward":
        group_by_length = preset.length_group_batches if variant == "length-grouped" else None
        module = RewardModule(model_dir, share_prompt=variant != "two-row", **common)
        return module, PreferenceDataModule(**data, group_by_length=group_by_length)
    reference = "precomputed" if variant == "precomputed-ref" else "copy"
    module = DPOModule(model_dir, beta=DPO_BETA, reference=reference, share_prompt=variant != "two-row",
                       reference_cache_dir=str(workdir / "plpost-ref-cache"), **common)
    return module, PreferenceDataModule(**data)


def run(stage: str, variant: str, preset: Preset, model_dir: str, rows: list[dict], workdir: Path,
        clock: StepClock) -> dict:
    module, data = build(stage, variant, preset, model_dir, rows, workdir)
    trainer = L.Trainer(
        accelerator="gpu" if preset.device == "cuda" else "cpu",
        devices=1,
        precision=PRECISION[preset.precision],
        max_steps=preset.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[ClockCallback(clock)],
    )
    trainer.fit(module, data)
    return {"params": matmul_parameters(module.policy), "settings": settings(stage, variant, preset)}


def settings(stage: str, variant: str, preset: Preset) -> str:
    if stage == "sft":
        return (f"SFTModule(gradient_checkpointing={variant == 'checkpointed'}, torch_compile={variant == 'compiled'})"
                f" + ChatDataModule(packing={variant == 'padding-free'})")
    if stage == "reward":
        grouping = f"group_by_length={preset.length_group_batches}" if variant == "length-grouped" else ""
        return f"RewardModule(share_prompt={variant != 'two-row'}) + PreferenceDataModule({grouping})"
    reference = "precomputed" if variant == "precomputed-ref" else "copy"
    return f"DPOModule(reference={reference}, share_prompt={variant != 'two-row'})"
