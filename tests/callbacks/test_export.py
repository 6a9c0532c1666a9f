"""The exported folder loads in transformers / peft as is and reproduces the trained model."""

import json

import lightning as L
import torch
from conftest import TINY
from transformers import AutoModelForCausalLM, AutoTokenizer

from plpost import ChatDataModule, SFTModule
from plpost.callbacks import HFExport
from plpost.generation import generate_texts
from plpost.modules import ModelSettings, LoraSettings


def train_and_export(tmp_path, lora=None):
    L.seed_everything(0)
    module = SFTModule(TINY, model_settings=ModelSettings(lora=lora), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatDataModule(TINY, train="plpost:data/addition/sft.jsonl", batch_size=16, max_length=32)
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HFExport(str(tmp_path / "export"))],
    )
    trainer.fit(module, data)
    return module, tmp_path / "export"


def logits_of(model, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "37+48"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_full_model_round_trip(tmp_path):
    module, folder = train_and_export(tmp_path)
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(logits_of(reloaded, tokenizer), logits_of(module.policy, tokenizer))
    generation = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|end|>") in generation["eos_token_id"]
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    out = reloaded.generate(**tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1"}], add_generation_prompt=True, return_tensors="pt", return_dict=True),
        max_new_tokens=4)
    assert out.shape[1] > 0
    assert len(generate_texts(reloaded, tokenizer, [[{"role": "user", "content": "1+1"}]], max_new_tokens=4).texts) == 1


def test_lora_adapter_and_merged_exports(tmp_path):
    from peft import PeftModel

    module, folder = train_and_export(tmp_path / "adapter", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(module.load_pretrained().name_or_path)
    adapted = PeftModel.from_pretrained(base, folder)
    expected = logits_of(module.policy, tokenizer)
    torch.testing.assert_close(logits_of(adapted, tokenizer), expected)

    merged_module, merged_folder = train_and_export(
        tmp_path / "merged", lora=LoraSettings(r=4, alpha=8, dropout=0.0, merge_on_export=True)
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_folder)
    assert not (merged_folder / "adapter_config.json").exists()
    torch.testing.assert_close(logits_of(merged, tokenizer), logits_of(merged_module.policy, tokenizer), rtol=1e-4, atol=1e-5)
    assert any("lora_" in n for n, _ in merged_module.policy.named_parameters())  # training copy kept its adapter
