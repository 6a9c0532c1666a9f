"""The `plpost` command prints none of the notices a user cannot act on, and still prints one they can."""

import subprocess
import sys

import pytest

NOISE = (
    "Tip: For seamless cloud",  # Lightning's litlogger / litmodels advertisements
    "LeafSpec",  # Lightning's use of a deprecated torch API
    "is_gradient_checkpointing",  # peft's use of a deprecated transformers API (LoRA)
    "Loading `train_dataloader` to estimate",  # asked for by plpost's schedule
    "Loading weights",  # transformers' bar for a 3 MB model
    "Writing model shards",
)


@pytest.mark.slow
def test_a_short_lora_sft_run_prints_no_noise(tmp_path):
    command = [
        sys.executable, "-m", "plpost.cli", "fit", "--model=plpost.SFTModule", "--model.model=plpost:tiny",
        "--model.model_settings.lora.r=4", "--model.scheduler=plpost.optim.WarmupCosineLR", "--model.scheduler.warmup_steps=1",
        "--data=plpost.ChatDataModule", "--data.tokenizer=plpost:tiny", "--data.train=plpost:data/addition/sft.jsonl",
        "--data.batch_size=8", "--data.max_length=32", "--trainer.max_steps=2", "--trainer.limit_train_batches=2",
        "--trainer.log_every_n_steps=50", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.callbacks+=plpost.callbacks.HFExport", f"--trainer.callbacks.dirpath={tmp_path / 'model'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert [noise for noise in NOISE if noise in printed] == []
    # An actionable warning stays: 2 batches never reach a logging interval of 50.
    assert "smaller than the logging interval" in printed
    assert (tmp_path / "model" / "adapter_config.json").exists()
