"""`plpost export`: a checkpoint of every stage becomes the very folder HFExport writes, which
transformers / peft reload with the trained logits (a killed run's last.ckpt: tests/reliability)."""

import filecmp

import lightning as L
import pytest
import torch
from conftest import TINY
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from plpost import ChatDataModule, DPOModule, PPOModule, PreferenceDataModule, PromptDataModule, RewardModule, SFTModule
from plpost.callbacks import HFExport
from plpost.cli import main
from plpost.export import CheckpointError, export_checkpoint, module_from_checkpoint
from plpost.modules import ModelSettings, LoraSettings
from plpost.rewards import RewardFunction
from plpost.tasks.addition import exact_match_reward

DATA = "plpost:data/addition/"


def sft_stage():
    return SFTModule(TINY), ChatDataModule(TINY, train=DATA + "sft.jsonl", batch_size=8, max_length=32)


def lora_stage(merge: bool):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, merge_on_export=merge)
    return SFTModule(TINY, model_settings=ModelSettings(lora=lora)), ChatDataModule(TINY, train=DATA + "sft.jsonl", batch_size=8, max_length=32)


def preference_data():
    return PreferenceDataModule(TINY, train=DATA + "preference.jsonl", batch_size=8, max_length=32)


def ppo_stage():
    module = PPOModule(TINY, rewards=[RewardFunction(exact_match_reward)], max_new_tokens=4, ppo_epochs=1)
    return module, PromptDataModule(TINY, train=DATA + "prompts.jsonl", batch_size=4)


STAGES = {
    "sft": sft_stage,
    "sft-lora-adapter": lambda: lora_stage(merge=False),
    "sft-lora-merged": lambda: lora_stage(merge=True),
    "reward": lambda: (RewardModule(TINY), preference_data()),
    "dpo": lambda: (DPOModule(TINY), preference_data()),
    "ppo": ppo_stage,
}


def fit_with_export_and_checkpoint(stage: str, folder):
    L.seed_everything(0)
    module, data = STAGES[stage]()
    L.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[HFExport(str(folder / "hf-export")), ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)],
    ).fit(module, data)
    return module


def same_files(expected, actual) -> list[str]:
    names = sorted(path.name for path in expected.iterdir())
    assert names == sorted(path.name for path in actual.iterdir())
    return [name for name in names if not filecmp.cmp(expected / name, actual / name, shallow=False)]


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "37+48"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("stage", list(STAGES))
def test_export_of_a_checkpoint_is_the_folder_hf_export_writes(stage, tmp_path):
    """The same code writes both folders from the same weights, so every file is byte-identical."""
    fit_with_export_and_checkpoint(stage, tmp_path)
    main(["export", str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"), "--quiet"])
    assert same_files(tmp_path / "hf-export", tmp_path / "exported") == []


def test_reloaded_exports_give_the_trained_logits(tmp_path):
    """Reward model: a sequence-classification folder with one output; LoRA adapter: loads on its base."""
    from peft import PeftModel

    reward = fit_with_export_and_checkpoint("reward", tmp_path / "reward")
    folder = export_checkpoint(tmp_path / "reward" / "checkpoints" / "last.ckpt", tmp_path / "reward-out")
    classifier = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert classifier.config.num_labels == 1
    torch.testing.assert_close(logits(classifier, tokenizer), logits(reward.policy, tokenizer))

    adapted = fit_with_export_and_checkpoint("sft-lora-adapter", tmp_path / "lora")
    folder = export_checkpoint(tmp_path / "lora" / "checkpoints" / "last.ckpt", tmp_path / "lora-out")
    base = AutoModelForCausalLM.from_pretrained(adapted.load_pretrained().name_or_path)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, folder), tokenizer),
                               logits(adapted.policy, tokenizer))
    merged = export_checkpoint(tmp_path / "lora" / "checkpoints" / "last.ckpt", tmp_path / "merged-out", merge=True)
    assert not (merged / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), tokenizer),
                               logits(adapted.policy, tokenizer), rtol=1e-4, atol=1e-5)


def test_a_checkpoint_that_does_not_name_its_stage_needs_stage(tmp_path, capsys):
    fit_with_export_and_checkpoint("sft", tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["plpost_stage"]
    torch.save(checkpoint, tmp_path / "anonymous.ckpt")
    with pytest.raises(CheckpointError, match="pass --stage"):
        module_from_checkpoint(tmp_path / "anonymous.ckpt")
    with pytest.raises(SystemExit) as exited:
        main(["export", str(tmp_path / "anonymous.ckpt"), str(tmp_path / "out")])
    assert exited.value.code == 2 and "pass --stage" in capsys.readouterr().err
    main(["export", str(tmp_path / "anonymous.ckpt"), str(tmp_path / "out"), "--stage", "SFTModule", "--quiet"])
    assert same_files(tmp_path / "hf-export", tmp_path / "out") == []
    with pytest.raises(CheckpointError, match="does not fit the policy.*pass the --stage that saved it"):
        module_from_checkpoint(tmp_path / "anonymous.ckpt", stage="RewardModule")  # weights of another shape
