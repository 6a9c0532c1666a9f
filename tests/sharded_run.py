"""A few SGD steps of one stage on 2 CPU processes, DDP or FSDP2-sharded, exported with HFExport.

    python tests/sharded_run.py OUT STRATEGY STAGE...     (STRATEGY: ddp, sharded or tensor-parallel)

STAGE: sft, sft-packed, sft-lora, sft-merged, sft-bf16 (precision bf16-mixed), sft-untied (the bundled
model with a head of its own, not tied to the embeddings, written to OUT/untied-model), reward, dpo, dpo-adapter,
dpo-precomputed, orpo, kto, ppo, ppo-critic, grpo, distill, one fit after the other in the same two processes. Run as a script because Lightning's launcher starts the other process by re-running
the command line. Writes each stage's export to OUT/STAGE/model, from rank 0, the sum of each
rank's local policy parameters to OUT/STAGE/sums.pt, and, from each rank, the greedy completions
GenerationEval made at the end of training (each rank generates its share, every rank holds all) to
OUT/STAGE/generations-RANK.json (not for reward), and
the dtype of the weights the first decoder layer computes with to OUT/STAGE/compute-dtype.txt, and
the FSDP units of the policy, each as the names of its modules, to OUT/STAGE/units.json.
"""


import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from plpost import (ChatDataModule, DistillationModule, DPOModule, FeedbackDataModule, GRPOModule, KTOModule, PPOModule,
                    PreferenceDataModule, PromptDataModule, RewardModule, SFTModule)
from plpost.callbacks import GenerationEval, HFExport
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.modules import ModelSettings, LoraSettings
from plpost.rewards import RewardFunction

STEPS = 3
DEVICES = 2
PRECISION = {"sft-bf16": "bf16-mixed"}


def chats() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": "4" * (i % 7 + 1)}]}
        for i in range(8 * STEPS)
    ]


def pairs() -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": "4" * (i % 5 + 2)} for i in range(4 * STEPS)]


def prompts() -> list[dict]:
    return [{"prompt": f"{i}+{i}="} for i in range(4 * STEPS)]


def text_reward(prompts: list, completions: list[str], **columns) -> torch.Tensor:
    return torch.tensor([float(sum(map(ord, c)) % 7) for c in completions])


class ComputeDtype(L.Callback):
    """Records the dtype of the weights the first decoder layer's first linear layer computes with."""

    def __init__(self) -> None:
        self.dtypes: set[str] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        linear = next(m for name, m in pl_module.policy.named_modules() if ".layers.0." in name and isinstance(m, torch.nn.Linear))
        linear.register_forward_pre_hook(lambda module, args: self.dtypes.add(str(module.weight.dtype)))


def write_untied_model(folder: Path) -> None:
    """The bundled model with its head a copy of the embeddings, no longer the same tensor."""
    model = load_causal_lm("plpost:tiny")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(folder)
    load_tokenizer("plpost:tiny").save_pretrained(folder)


def fsdp_units(model: torch.nn.Module) -> list[list[str]]:
    from torch.distributed.fsdp import FSDPModule

    names = {module: name for name, module in model.named_modules()}
    states = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            states.setdefault(id(state), []).append(names[module])
    return sorted(states.values())


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def build(stage: str, cache: Path):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, merge_on_export=stage == "sft-merged")
    lora = lora if stage in ("sft-lora", "sft-merged", "dpo-adapter") else None
    if stage in ("ppo", "ppo-critic", "grpo"):
        data = PromptDataModule("plpost:tiny", prompts(), batch_size=2, shuffle=False)
        online = GRPOModule if stage == "grpo" else PPOModule
        extra = {"grpo": {"num_generations": 2}, "ppo-critic": {"value_model": "critic", "critic_model": "plpost:tiny"}}
        extra = extra.get(stage, {})
        return online("plpost:tiny", rewards=[RewardFunction(text_reward)], max_new_tokens=6, optimizer=sgd, **extra), data
    if stage == "distill":  # a random student, so the teacher has something to teach
        data = PromptDataModule("plpost:tiny", prompts(), batch_size=2, shuffle=False)
        return DistillationModule("plpost:tiny", "plpost:tiny", model_settings=ModelSettings(random_init=True), max_new_tokens=6, optimizer=sgd), data
    if stage == "kto":  # the pairs as unpaired rows: one desirable, one undesirable each
        data = FeedbackDataModule("plpost:tiny", train=pairs(), batch_size=2, shuffle=False)
        return KTOModule("plpost:tiny", optimizer=sgd), data
    if stage.startswith("sft"):
        data = ChatDataModule("plpost:tiny", train=chats(), batch_size=4, shuffle=False, packing=stage == "sft-packed")
        model = str(UNTIED) if stage == "sft-untied" else "plpost:tiny"
        return SFTModule(model, optimizer=sgd, model_settings=ModelSettings(lora=lora)), data
    data = PreferenceDataModule("plpost:tiny", train=pairs(), batch_size=2, shuffle=False)
    if stage == "reward":
        return RewardModule("plpost:tiny", optimizer=sgd), data
    if stage == "orpo":
        return DPOModule("plpost:tiny", optimizer=sgd, loss_type="orpo", reference="none"), data
    reference = {"dpo-adapter": "adapter", "dpo-precomputed": "precomputed"}.get(stage, "copy")
    return DPOModule("plpost:tiny", optimizer=sgd, reference=reference, model_settings=ModelSettings(lora=lora), reference_cache_dir=str(cache)), data


STRATEGIES = {
    "ddp": lambda: "ddp",
    "sharded": lambda: ModelParallelStrategy(data_parallel_size=DEVICES, tensor_parallel_size=1,
                                             process_group_backend="gloo"),
    # Lightning's defaults: every device for tensor parallelism, which plpost refuses.
    "tensor-parallel": lambda: ModelParallelStrategy(process_group_backend="gloo"),
}


def fit(out: Path, stage: str, strategy: str) -> None:
    L.seed_everything(0)
    module, data = build(stage, out / "reference-cache")
    dtype = ComputeDtype()
    evaluation = GenerationEval([{"prompt": f"{i}+{i + 1}="} for i in range(3)], every_n_steps=0, max_new_tokens=6)
    callbacks = [HFExport(str(out / "model")), dtype] + ([evaluation] if stage != "reward" else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=DEVICES, max_steps=STEPS, logger=False, enable_checkpointing=False,
        strategy=STRATEGIES[strategy](), enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        precision=PRECISION.get(stage, "32-true"),
    )
    trainer.fit(module, data)
    (out / f"generations-{trainer.global_rank}.json").write_text(json.dumps(evaluation.completions))
    local = torch.stack([p.detach().to_local().sum() if hasattr(p, "to_local") else p.detach().sum()
                         for p in module.policy.parameters()]).sum()
    sums = trainer.strategy.all_gather(local)
    if trainer.is_global_zero:
        torch.save(sums, out / "sums.pt")
        (out / "compute-dtype.txt").write_text(" ".join(sorted(dtype.dtypes)))
        if strategy == "sharded":
            (out / "units.json").write_text(json.dumps(fsdp_units(module.policy)))


if __name__ == "__main__":
    UNTIED = Path(sys.argv[1]) / "untied-model"
    # Written by the first process, before its first fit starts the second (which then finds it).
    if "sft-untied" in sys.argv[3:] and not UNTIED.exists():
        write_untied_model(UNTIED)
    for name in sys.argv[3:]:
        fit(Path(sys.argv[1]) / name, name, sys.argv[2])
