"""Every YAML in configs/ is parsed by the CLI and run for two steps; the test counts them.

Presets for real Hub models cannot download here, so they are parsed as they are, then run with
the model, tokenizer and data swapped for the bundled tiny ones (and precision for CPU): what
is checked is that every other setting they hold is valid and runs.
"""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from plpost.cli import PostTrainingCLI

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
TINY_CONFIGS = [c for c in CONFIGS if c.parent.name == "tiny"]
PRESETS = [c for c in CONFIGS if c.parent.name != "tiny"]


def test_configs_are_counted():
    """Adding a config without it being exercised here is impossible: this is the census."""
    assert len(TINY_CONFIGS) == 11, [c.name for c in TINY_CONFIGS]
    assert len(PRESETS) == 10, [c.name for c in PRESETS]


def short_run_args(config: Path) -> list[str]:
    return [
        f"--config={config}", "--trainer.max_steps=2", "--trainer.limit_val_batches=2",
        "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
    ]


class TrainedWeights(L.Callback):
    """The trainable tensors when training starts (after `configure_model`), and which moved by its end."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module) -> None:
        now = dict(pl_module.named_parameters())
        self.unmoved = [name for name, before in self.start.items() if torch.equal(now[name].detach(), before)]


def fit_briefly(args: list[str]) -> tuple[PostTrainingCLI, TrainedWeights]:
    """The config's run as `plpost fit` builds it, for the steps `args` allow, with the trained weights watched."""
    cli = PostTrainingCLI(args=args, run=False)
    weights = TrainedWeights()
    cli.trainer.callbacks.append(weights)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, weights


def assert_it_trained(cli: PostTrainingCLI, weights: TrainedWeights) -> None:
    """Two optimizer steps (at least: PPO takes several per rollout) that moved every trainable tensor,
    with every logged number finite."""
    assert cli.trainer.global_step >= 2
    assert weights.start and not weights.unmoved, weights.unmoved
    logged = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert logged and all(math.isfinite(value) for value in logged.values()), logged


STARTS_FROM_SFT = {"grpo.yaml", "grpo-gspo.yaml", "grpo-tools.yaml", "grpo-qwen2.5-0.5b.yaml", "grpo-tools-qwen2.5-0.5b.yaml"}
"""Configs whose stage learns nothing from the bundled base model in two steps (see `sft_export`)."""


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: c.name)
def test_tiny_config_trains_with_its_callbacks(config, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # the configs write under ./outputs
    args = short_run_args(config)
    if config.name in STARTS_FROM_SFT:
        args.append(f"--model.init_args.model={request.getfixturevalue('sft_export')}")
    assert_it_trained(*fit_briefly(args))


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> str:
    """A reward-model folder shaped like RewardModule's export, for presets that name one."""
    from plpost.hf import load_causal_lm, load_tokenizer
    from transformers import AutoModelForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-reward")
    tokenizer = load_tokenizer("plpost:tiny")
    load_causal_lm("plpost:tiny", auto_class=AutoModelForSequenceClassification, num_labels=1,
                   pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("config", PRESETS, ids=lambda c: f"{c.parent.name}/{c.name}")
def test_preset_parses_and_runs_on_the_tiny_model(config, tmp_path, monkeypatch, capsys, tiny_reward_model, request):
    with pytest.raises(SystemExit) as parsed:
        PostTrainingCLI(args=["fit", f"--config={config}", "--print_config"])
    assert parsed.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["init_args"]["model"] = request.getfixturevalue("sft_export") if config.name in STARTS_FROM_SFT else "plpost:tiny"
    raw["data"]["init_args"]["tokenizer"] = "plpost:tiny"
    raw["data"]["init_args"]["train"] = "plpost:data/addition/" + tiny_data_for(raw["data"]["class_path"])
    raw["data"]["init_args"].pop("val", None)
    for reward in raw["model"]["init_args"].get("rewards", []):
        if "path" in reward.get("init_args", {}):
            reward["init_args"]["path"] = tiny_reward_model
        if "answer_column" in reward.get("init_args", {}):
            reward["init_args"]["answer_column"] = "answer"  # the bundled prompts' column
        if "extract" in reward.get("init_args", {}):
            reward["init_args"]["extract"] = "last_number"  # the tiny SFT model answers with the bare sum
    if raw["model"]["init_args"].get("critic_model"):
        raw["model"]["init_args"]["critic_model"] = tiny_reward_model
    if raw["model"]["init_args"].get("teacher"):  # another model than the student, or nothing is learnt
        raw["model"]["init_args"]["teacher"] = request.getfixturevalue("sft_export")
    lengths = {"max_length": 64, "max_prompt_length": 32}
    raw["data"]["init_args"].update({k: v for k, v in lengths.items() if k in raw["data"]["init_args"]})
    if raw["model"]["init_args"].get("max_new_tokens", 0) > 32:  # a real model's budget, on the tiny one
        raw["model"]["init_args"]["max_new_tokens"] = 32
    raw["trainer"].update(precision="32-true", accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
    swapped = tmp_path / config.name
    swapped.write_text(yaml.safe_dump(raw))
    assert_it_trained(*fit_briefly(short_run_args(swapped) + ["--trainer.logger=false", "--trainer.callbacks=[]"]))


def tiny_data_for(data_class: str) -> str:
    return {"ChatDataModule": "sft.jsonl", "PreferenceDataModule": "preference.jsonl",
            "FeedbackDataModule": "preference.jsonl", "PromptDataModule": "prompts.jsonl"}[data_class.rsplit(".", 1)[-1]]
