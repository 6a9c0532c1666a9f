"""Builds stages' models under ModelParallelStrategy on 2 CPU processes (gloo), without a step, and
saves each sharded model's gathered weights and buffers from rank 0:

    python tests/sharded_load.py OUT STAGE...     (STAGE: sft, sft-lora, dpo, ppo-critic, distill, reward)

Writes OUT/STAGE/NAME.pt (NAME: policy, reference, critic, teacher) and OUT/STAGE/empty-RANK.json
(whether the rank built its models on the meta device). Run as a script because Lightning's
launcher starts the other process by re-running the command line.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from plpost import (ChatDataModule, DistillationModule, DPOModule, PPOModule, PreferenceDataModule, PromptDataModule,
                    RewardModule, SFTModule)
from plpost.frozen import FrozenCopy
from plpost.modules import ModelSettings, LoraSettings
from plpost.rewards import RewardFunction
from plpost.sharding import full_state_dict


def constant(prompts: list, completions: list[str], **columns) -> torch.Tensor:
    return torch.ones(len(completions))


def build(stage: str):
    prompts = PromptDataModule("plpost:tiny", [{"prompt": f"{i}+{i}="} for i in range(4)], batch_size=2)
    pairs = PreferenceDataModule("plpost:tiny", train=[{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": "9"}
                                                       for i in range(4)], batch_size=2)
    chats = ChatDataModule("plpost:tiny", train=[{"messages": [{"role": "user", "content": "1+1"},
                                                               {"role": "assistant", "content": "2"}]}] * 4, batch_size=2)
    if stage == "ppo-critic":
        return PPOModule("plpost:tiny", rewards=[RewardFunction(constant)], value_model="critic",
                         critic_model="plpost:tiny"), prompts
    if stage == "distill":
        return DistillationModule("plpost:tiny", "plpost:tiny"), prompts
    if stage == "dpo":
        return DPOModule("plpost:tiny", reference="copy"), pairs
    if stage == "reward":
        return RewardModule("plpost:tiny"), pairs
    return SFTModule("plpost:tiny", model_settings=ModelSettings(lora=LoraSettings(r=4) if stage == "sft-lora" else None)), chats


def load(out: Path, stage: str) -> None:
    L.seed_everything(0)
    module, data = build(stage)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=0, logger=False, enable_checkpointing=False,
                        strategy=strategy, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"empty-{trainer.global_rank}.json").write_text(json.dumps(module.builds_empty()))
    for name in ("policy", "reference", "critic", "teacher"):
        model = getattr(module, name, None)
        model = model.model if isinstance(model, FrozenCopy) else model
        if model is None:
            continue
        weights = full_state_dict(model)  # every rank takes part
        if trainer.is_global_zero:
            buffers = {key: value for key, value in model.named_buffers() if key not in weights}
            torch.save({"weights": weights, "buffers": buffers}, out / f"{name}.pt")


if __name__ == "__main__":
    for name in sys.argv[2:]:
        load(Path(sys.argv[1]) / name, name)
