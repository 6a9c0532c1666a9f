"""Common mistakes stop before training with one sentence that names the fix."""

import lightning as L
import pytest
import torch
from conftest import TINY
from transformers import LlamaConfig, LlamaForSequenceClassification

from plpost import ChatDataModule, DPOModule, PPOModule, PreferenceDataModule, PromptDataModule, SFTModule
from plpost.cli import PostTrainingCLI
from plpost.data.formats import DataValidationError
from plpost.hf import load_tokenizer
from plpost.rewards import RewardFunction, RewardModel

DATA = "plpost:data/addition/"


def digit_reward(prompts, completions, **columns):
    return torch.zeros(len(completions))


def fit(module, data):
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, data)


def test_a_stage_with_the_wrong_data_module_is_refused_before_any_model_loads():
    dpo = DPOModule(TINY)
    with pytest.raises(TypeError, match=r"DPOModule trains on a PreferenceDataModule, not a ChatDataModule: give it"):
        fit(dpo, ChatDataModule(TINY, train=DATA + "sft.jsonl", batch_size=4, max_length=32))
    assert dpo.policy is None
    ppo = PPOModule(TINY, rewards=[RewardFunction(digit_reward)])
    with pytest.raises(TypeError, match=r"PPOModule trains on a PromptDataModule, not a PreferenceDataModule"):
        fit(ppo, PreferenceDataModule(TINY, train=DATA + "preference.jsonl", batch_size=4, max_length=32))


def test_the_cli_names_the_class_path_to_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"data.class_path: plpost.PreferenceDataModule"):
        PostTrainingCLI(args=[
            "fit", "--model=plpost.DPOModule", "--model.model=plpost:tiny", "--data=plpost.ChatDataModule",
            "--data.tokenizer=plpost:tiny", f"--data.train={DATA}sft.jsonl", "--trainer.max_steps=1",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        ])


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """The tiny model embeds 263 ids; a tokenizer with 300 more tokens has ids it cannot embed."""
    tokenizer = load_tokenizer(TINY)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(300)])
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has 5\d\d tokens but the model plpost:tiny embeds only 263: give the model's own"):
        fit(SFTModule(TINY), ChatDataModule(str(tmp_path), train=DATA + "sft.jsonl", batch_size=4, max_length=32))


def test_a_reward_model_with_two_outputs_is_refused(tmp_path, tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ppo = PPOModule(TINY, rewards=[RewardModel(str(tmp_path))])
    with pytest.raises(ValueError, match=r"has 2 outputs, but a reward is one number: give a RewardModule export"):
        fit(ppo, PromptDataModule(TINY, train=DATA + "prompts.jsonl", batch_size=4))


@pytest.mark.parametrize("data_module", [ChatDataModule, PreferenceDataModule])
def test_a_max_length_shorter_than_every_prompt_is_refused(data_module):
    """Addition prompts are about 8 tokens; max_length=4 leaves no completion token in any record."""
    source = DATA + ("sft.jsonl" if data_module is ChatDataModule else "preference.jsonl")
    data = data_module(TINY, train=source, batch_size=4, max_length=4)
    with pytest.raises(DataValidationError, match=r"no record is usable .*; raise max_length \(now 4\)"):
        data.setup("fit")
