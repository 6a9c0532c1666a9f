"""Fits on 2 CPU processes where the ranks' data differ in what makes a rank take another path:

    python tests/uneven_run.py OUT STRATEGY CASE...     (STRATEGY: ddp or sharded)

CASE:
- grpo-dynamic: GRPO with dynamic sampling where only rank 0's prompts (the even positions; ranks
  interleave) always score the same, so only rank 0 has groups to sample again.
- sft, dpo, kto, grpo, ppo, distill: an odd number of rows, so the last batch of an epoch is short
  (and on one rank wraps around to the first rows), two epochs.
Every case ends with GenerationEval over 3 prompts (2 on rank 0, 1 on rank 1), over 1 prompt
(none on rank 1), both alone and as a TryAgain episode. Writes OUT/CASE/done-RANK.json from each rank:
its own resampled groups (grpo-dynamic) and the gathered evaluation completions and conversations.
Run as a script because Lightning's launcher starts the other process by re-running the command line.
"""

import faulthandler
import itertools
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from plpost import (ChatDataModule, DistillationModule, DPOModule, FeedbackDataModule, GRPOModule, KTOModule, PPOModule,
                    PreferenceDataModule, PromptDataModule, SFTModule)
from plpost.callbacks import GenerationEval
from plpost.modules import ModelSettings
from plpost.rewards import RewardFunction
from plpost.tasks.addition import TryAgain

ROWS = 7
DISTINCT = itertools.count()


def same_for_even(prompts: list, completions: list[str], **columns) -> torch.Tensor:
    """1.0 for a "same" prompt (rank 0's), a new value at every completion otherwise (rank 1's)."""
    return torch.tensor([1.0 if "same" in str(p) else float(next(DISTINCT)) for p in prompts])


class ResamplesKept(GRPOModule):
    """GRPO that keeps how many groups this rank sampled again."""

    resampled = 0

    def generate(self, batch):
        groups = super().generate(batch)
        self.resampled += groups.resampled
        return groups


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def build(case: str):
    prompts = [{"prompt": f"{i}+{i}="} for i in range(ROWS)]
    online = dict(max_new_tokens=4, optimizer=sgd)
    if case == "grpo-dynamic":
        rows = [{"prompt": f"{'same' if i % 2 == 0 else 'differ'} {i}="} for i in range(8)]
        module = ResamplesKept("plpost:tiny", rewards=[RewardFunction(same_for_even)], num_generations=2,
                               dynamic_sampling=True, max_resample_rounds=2, **online)
        return module, PromptDataModule("plpost:tiny", rows, batch_size=2, shuffle=False)
    if case in ("grpo", "ppo"):
        stage = GRPOModule if case == "grpo" else PPOModule
        extra = {"num_generations": 2} if case == "grpo" else {}
        module = stage("plpost:tiny", rewards=[RewardFunction(same_for_even)], **extra, **online)
        return module, PromptDataModule("plpost:tiny", prompts, batch_size=2, shuffle=False)
    if case == "distill":
        return (DistillationModule("plpost:tiny", "plpost:tiny", model_settings=ModelSettings(random_init=True), **online),
                PromptDataModule("plpost:tiny", prompts, batch_size=2, shuffle=False))
    pairs = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": "4" * (i % 5 + 2)} for i in range(ROWS)]
    if case == "dpo":
        return DPOModule("plpost:tiny", optimizer=sgd), PreferenceDataModule("plpost:tiny", train=pairs, batch_size=2,
                                                                              shuffle=False)
    if case == "kto":
        return KTOModule("plpost:tiny", optimizer=sgd), FeedbackDataModule("plpost:tiny", train=pairs, batch_size=2,
                                                                            shuffle=False)
    chats = [{"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": "4" * (i + 1)}]}
             for i in range(ROWS)]
    return SFTModule("plpost:tiny", optimizer=sgd), ChatDataModule("plpost:tiny", train=chats, batch_size=2, shuffle=False)


STRATEGIES = {
    "ddp": lambda: "ddp",
    "sharded": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"),
}


def fit(out: Path, case: str, strategy: str) -> None:
    L.seed_everything(0)
    module, data = build(case)
    three = GenerationEval([{"prompt": f"{i}+{i + 1}="} for i in range(3)], every_n_steps=0, max_new_tokens=4)
    one = GenerationEval([{"prompt": "1+2="}], every_n_steps=0, max_new_tokens=4, name="one")
    episodes = GenerationEval([{"prompt": [{"role": "user", "content": "1+2"}], "answer": "3"}],
                              environment=TryAgain(max_turns=2), every_n_steps=0, max_new_tokens=4, name="try-again")
    epochs = 1 if case == "grpo-dynamic" else 2
    trainer = L.Trainer(accelerator="cpu", devices=2, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        strategy=STRATEGIES[strategy](), enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[three, one, episodes])
    trainer.fit(module, data)
    out.mkdir(parents=True, exist_ok=True)
    done = {"resampled": getattr(module, "resampled", None), "three": three.completions, "one": one.completions,
            "episodes": episodes.conversations}
    (out / f"done-{trainer.global_rank}.json").write_text(json.dumps(done))


if __name__ == "__main__":
    # A rank waiting in a collective that another rank never enters prints where each one waits, and exits.
    faulthandler.dump_traceback_later(float(os.environ.get("PLPOST_HANG_AFTER_S", 300)), exit=True)
    for name in sys.argv[3:]:
        fit(Path(sys.argv[1]) / name, name, sys.argv[2])
