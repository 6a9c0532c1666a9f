"""TRL's SFTTrainer / RewardTrainer / DPOTrainer with the same model, data and settings.

TRL defaults that differ from the shared settings are overridden (TRL turns on gradient
checkpointing and bf16 by default; the HF Trainer clips gradients at 1.0, shuffles, and uses a
linear schedule). Everything else is TRL's default: its logging every 10 steps, its metrics
(entropy, token accuracy, reward statistics), its fused chunked LM head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from benchmarks.data import length_grouped_row_order
from benchmarks.frameworks import DPO_BETA, attention_implementation
from benchmarks.measure import StepClock, matmul_parameters
from benchmarks.presets import Preset


class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_end()


def counting(trainer_class: type, clock: StepClock) -> type:
    """`trainer_class` that counts each micro-batch it trains on."""

    class Counting(trainer_class):
        def training_step(self, model, inputs, *args, **kwargs):
            clock.batch(inputs["input_ids"], inputs.get("attention_mask"))
            return super().training_step(model, inputs, *args, **kwargs)

    return Counting


def shared_settings(preset: Preset, workdir: Path) -> dict:
    return dict(
        output_dir=str(workdir / "trl-output"),
        per_device_train_batch_size=preset.batch_size,
        gradient_accumulation_steps=1,
        max_steps=preset.steps,
        learning_rate=preset.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping, as in plpost and the raw loop
        optim="adamw_torch_fused" if preset.fused_adamw else "adamw_torch",
        gradient_checkpointing=False,
        bf16=preset.precision == "bf16-mixed",
        fp16=False,
        use_cpu=preset.device == "cpu",
        train_sampling_strategy="sequential",  # the rows in the order every framework reads them
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=preset.seed,
    )


def load_model(stage: str, model_dir: str, tokenizer) -> torch.nn.Module:
    kwargs = dict(dtype=torch.float32, attn_implementation=attention_implementation())
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def run(stage: str, variant: str, preset: Preset, model_dir: str, rows: list[dict], workdir: Path,
        clock: StepClock) -> dict:
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(stage, model_dir, tokenizer)
    if variant == "length-grouped":  # TRL reads them in order (train_sampling_strategy="sequential")
        rows = [rows[i] for i in length_grouped_row_order(preset, rows, tokenizer)]
    dataset = Dataset.from_list(rows)
    common = shared_settings(preset, workdir)
    if stage == "sft":
        padding_free = variant == "padding-free"
        common["gradient_checkpointing"] = variant == "checkpointed"
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        common["torch_compile"] = variant == "compiled"
        # TRL enforces max_length only by packing or truncating; with padding_free and no packing it
        # asks for max_length=None. The rows are generated within max_length, so nothing is cut either way.
        args = SFTConfig(**common, assistant_only_loss=True, packing=False, padding_free=padding_free,
                         max_length=None if padding_free else preset.max_length)
        trainer_class = SFTTrainer
        settings = (f"SFTConfig(padding_free={padding_free}, packing=False, assistant_only_loss=True, "
                    f"gradient_checkpointing={common['gradient_checkpointing']}, "
                    f"torch_compile={common['torch_compile']})")
    elif stage == "reward":
        args = RewardConfig(**common, max_length=preset.max_length)
        trainer_class = RewardTrainer
        settings = "RewardConfig()"
        if variant == "length-grouped":
            settings += ", pairs handed over in plpost's length-grouped order"
    else:
        precompute = variant == "precomputed-ref"
        args = DPOConfig(**common, max_length=preset.max_length, beta=DPO_BETA, loss_type=["sigmoid"],
                         precompute_ref_log_probs=precompute)
        trainer_class = DPOTrainer
        settings = f"DPOConfig(precompute_ref_log_probs={precompute}, loss_type=sigmoid)"
    trainer = counting(trainer_class, clock)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[ClockCallback(clock)]
    )
    trainer.train()
    return {"params": matmul_parameters(model), "settings": settings}
