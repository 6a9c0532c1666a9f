"""A short training run of one stage with a checkpoint after every optimizer step; it can kill itself.

`train(run)` is called in-process for uninterrupted and resumed runs, and in a spawned child for
the run that is killed (SIGKILL ends it as abruptly as an out-of-memory kill would). Every micro-batch's
records are appended to `seen-RANK.jsonl` before it is trained on, so what a killed run saw survives it.

On 2 processes (DDP or FSDP2-sharded) it runs as a script, since Lightning's launcher starts the
other process by re-running the command line:

    python tests/reliability/resume_harness.py FOLDER STRATEGY MODEL [--kill-after N] [--resume] STAGE...

each stage in FOLDER/STAGE, one after the other in the same two processes; each rank writes the
state it ends with to FOLDER/STAGE/result-RANK.pt. A killed 2-process run kills its whole process
group (both ranks at once, as a node failure would): launch it in a session of its own.

Adding a stage to the resume tests takes one entry in STAGES: a function that builds its
module and data module from `Run`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from plpost import (ChatDataModule, DistillationModule, DPOModule, GRPOModule, PPOModule, PreferenceDataModule,
                    PromptDataModule, RewardModule, SFTModule)
from plpost import FeedbackDataModule, KTOModule
from plpost.callbacks.guards import batch_records
from plpost.data.prompts import PromptBatch
from plpost.modules import ModelSettings
from plpost.optim import WarmupCosineLR
from plpost.rewards import EnvironmentReward, RewardFunction
from plpost.tasks.addition import TryAgain

TINY = "plpost:tiny"
RECORDS = 12  # batch_size 2 x accumulate 2: 3 optimizer steps per epoch


@dataclass
class Run:
    stage: str
    folder: Path
    model: str = TINY
    max_steps: int = 7
    batch_size: int = 2
    accumulate: int = 2
    kill_after_step: int | None = None
    """SIGKILL at the start of the step after this many optimizer steps (all checkpointed)."""
    kill_while_saving_step: int | None = None
    """SIGKILL halfway through writing the checkpoint of this optimizer step."""
    resume: bool = False
    """Resume from the last checkpoint in `folder` (ckpt_path="last")."""
    strategy: str = "auto"
    """A key of STRATEGIES: on 2 processes, "ddp", "sharded" (distributed checkpoint folders) or
    "sharded-full" (full-state checkpoint files)."""


def sharded(save_distributed_checkpoint: bool) -> Callable[[], ModelParallelStrategy]:
    return lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo",
                                         save_distributed_checkpoint=save_distributed_checkpoint)


STRATEGIES: dict[str, Callable[[], Any]] = {
    "auto": lambda: "auto", "ddp": lambda: "ddp", "sharded": sharded(True), "sharded-full": sharded(False),
}


def devices(run: Run) -> int:
    return 1 if run.strategy == "auto" else 2


def save_dropout_model(folder: Path) -> str:
    """The bundled tiny model with attention dropout 0.1, so training draws random numbers."""
    from plpost.hf import load_causal_lm, load_tokenizer

    model = load_causal_lm(TINY)
    model.config.attention_dropout = 0.1
    model.save_pretrained(folder)
    load_tokenizer(TINY).save_pretrained(folder)
    return str(folder)


def chat_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": "7" * (i % 5 + 1)}]}
        for i in range(RECORDS)
    ]


def pair_rows() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"{i}+{i * 3}"}],
            "chosen": [{"role": "assistant", "content": "7" * (i % 4 + 1)}],
            "rejected": [{"role": "assistant", "content": "3" * (RECORDS - i) + "1"}],
        }
        for i in range(RECORDS)
    ]


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def warmup_cosine(optimizer):
    # total_steps=None asks for trainer.estimated_stepping_batches in configure_optimizers, the
    # case in which Lightning 2.5 did not restore a stateful DataLoader (issue #20550): covered.
    return WarmupCosineLR(optimizer, warmup_steps=2, min_lr_ratio=0.1)


def sft(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    module = SFTModule(run.model, optimizer=adamw, scheduler=warmup_cosine)
    return module, ChatDataModule(TINY, train=chat_rows(), batch_size=run.batch_size, max_length=64)


def reward(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    module = RewardModule(run.model, optimizer=adamw, scheduler=warmup_cosine)
    return module, PreferenceDataModule(TINY, train=pair_rows(), batch_size=run.batch_size, max_length=64)


def dpo(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    module = DPOModule(run.model, optimizer=adamw, scheduler=warmup_cosine)
    return module, PreferenceDataModule(TINY, train=pair_rows(), batch_size=run.batch_size, max_length=64)


def kto(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    module = KTOModule(run.model, optimizer=adamw, scheduler=warmup_cosine)
    return module, FeedbackDataModule(TINY, train=pair_rows(), batch_size=run.batch_size, max_length=64)


def completion_length(prompts, completions, **columns) -> torch.Tensor:
    """Differs between completions, so every group has advantages to train on."""
    return torch.tensor([float(len(completion)) for completion in completions])


def ppo(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    module = PPOModule(run.model, rewards=[RewardFunction(completion_length)], max_new_tokens=4, ppo_epochs=1,
                       gradient_accumulation_steps=run.accumulate, optimizer=adamw, scheduler=warmup_cosine)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i * 3}"}]} for i in range(RECORDS)]
    return module, PromptDataModule(TINY, train=rows, batch_size=run.batch_size * run.accumulate)


def grpo(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    # Manual optimization: the accumulation is the module's own, and sampling draws random numbers
    # every step, so the generators must be restored for the completions to be the same.
    module = GRPOModule(run.model, rewards=[RewardFunction(completion_length)], num_generations=4, max_new_tokens=4,
                        gradient_accumulation_steps=run.accumulate, optimizer=adamw, scheduler=warmup_cosine)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i * 3}"}]} for i in range(RECORDS)]
    return module, PromptDataModule(TINY, train=rows, batch_size=run.batch_size)


def episodes(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    # Multi-turn: a wrong answer is told so and answered again, so the episodes of a step end at
    # different turns, and what they hold depends on every earlier turn's samples.
    module = GRPOModule(run.model, rewards=[EnvironmentReward(), RewardFunction(completion_length)],
                        environment=TryAgain(max_turns=3), num_generations=4, max_new_tokens=6,
                        gradient_accumulation_steps=run.accumulate, optimizer=adamw, scheduler=warmup_cosine)
    rows = [{"prompt": [{"role": "user", "content": f"{i + 17}+{i * 3 + 25}"}], "answer": str(4 * i + 42)}
            for i in range(RECORDS)]
    return module, PromptDataModule(TINY, train=rows, batch_size=run.batch_size)


def distill(run: Run) -> tuple[L.LightningModule, L.LightningDataModule]:
    # A random student has a teacher to learn from; lmbda = 0.5 draws, every step, whether the
    # student samples or the dataset's completions are used: the restored generators decide both.
    module = DistillationModule(run.model, TINY, model_settings=ModelSettings(random_init=True), lmbda=0.5, max_new_tokens=4,
                                gradient_accumulation_steps=run.accumulate, optimizer=adamw, scheduler=warmup_cosine)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i * 3}"}],
             "completion": [{"role": "assistant", "content": "7" * (i % 4 + 1)}]} for i in range(RECORDS)]
    return module, PromptDataModule(TINY, train=rows, batch_size=run.batch_size, completions=True)


STAGES: dict[str, Callable[[Run], tuple[L.LightningModule, L.LightningDataModule]]] = {
    "sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "grpo": grpo, "distill": distill,
    "kto": kto, "episodes": episodes,
}
SAMPLES_EPISODES = {"episodes"}
"""Stages that need a policy which ends its turns (the bundled base model never does): the callers
give them an SFT export as the model."""


class RecordAndKill(L.Callback):
    def __init__(self, run: Run) -> None:
        self.run = run

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen = (self.run.folder / f"seen-{trainer.global_rank}.jsonl").open("a")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        first_micro_batch = batch_idx % trainer.accumulate_grad_batches == 0
        if first_micro_batch and trainer.global_step == self.run.kill_after_step:
            if trainer.world_size > 1:
                os.killpg(0, signal.SIGKILL)  # every rank: the first to get here takes the others with it
            os.kill(os.getpid(), signal.SIGKILL)
        if isinstance(batch, PromptBatch):  # no record indices: the prompts themselves
            records = batch.prompts
        else:
            records = batch_records(batch).tolist()
        self.seen.write(json.dumps({"step": trainer.global_step, "records": records}) + "\n")
        self.seen.flush()  # into the kernel: it outlives a SIGKILL of this process

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen.close()


def kill_while_writing(step: int, name: str = "last.ckpt") -> None:
    """Makes the write of checkpoint `name` at optimizer step `step` die halfway through.

    AtomicCheckpointIO writes `name` through a temporary file named `.{name}.*.tmp`. It patches
    torch.save for the rest of the process, so use it only in the child process that it kills."""
    save = torch.save

    def half_then_kill(obj, handle, *args, **kwargs):
        target = Path(getattr(handle, "name", "") or "").name
        if isinstance(obj, dict) and obj.get("global_step") == step and target.startswith(f".{name}."):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, handle, *args, **kwargs)

    torch.save = half_then_kill


def train_with_threads(run: Run, threads: int) -> dict:
    """`train(run)` computing on `threads` threads: a spawned child starts with torch's default, and
    another thread count sums some float32 reductions in another order, so a child that is to
    agree bit for bit with its parent must compute on as many threads as the parent."""
    torch.set_num_threads(threads)
    return train(run)


def train(run: Run) -> dict[str, Any]:
    """Trains `run` and returns the state an exact resume must reproduce, all as tensors and numbers."""
    run.folder.mkdir(parents=True, exist_ok=True)
    if run.kill_while_saving_step is not None:
        kill_while_writing(run.kill_while_saving_step)
    L.seed_everything(0, workers=True, verbose=False)
    module, data = STAGES[run.stage](run)
    checkpoints = ModelCheckpoint(dirpath=run.folder / "checkpoints", save_last=True, every_n_train_steps=1)
    accumulate = run.accumulate if module.automatic_optimization else 1
    trainer = L.Trainer(
        max_steps=run.max_steps, accumulate_grad_batches=accumulate, callbacks=[RecordAndKill(run), checkpoints],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=run.folder,
        num_sanity_val_steps=0, accelerator="cpu", devices=devices(run), strategy=STRATEGIES[run.strategy](),
    )
    trainer.fit(module, data, ckpt_path="last" if run.resume else None)
    return local({
        "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
    })


def local(state: Any) -> Any:
    """`state` with each sharded tensor (DTensor) replaced by this rank's shard of it, bit for bit."""
    if hasattr(state, "to_local"):
        return state.to_local().clone()
    if isinstance(state, dict):
        return {key: local(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(local(value) for value in state)
    return state


def seen(folder: Path, rank: int = 0) -> list[dict]:
    """(step, records) of every micro-batch rank `rank` trained on, in order, as written by RecordAndKill."""
    return [json.loads(line) for line in (folder / f"seen-{rank}.jsonl").read_text().splitlines()]


def differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where two nested states differ: tensors must be torch.equal (same dtype, shape and bits)."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        same = isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)
        same = same and expected.dtype == actual.dtype and torch.equal(expected, actual)
        return [] if same else [where]
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys():
            return [f"{where} keys {sorted(map(str, expected.keys() ^ actual.keys()))}"]
        return [d for key in expected for d in differences(expected[key], actual[key], f"{where}/{key}")]
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{where} length"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{where}[{i}]")]
    return [] if expected == actual else [where]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("strategy", choices=STRATEGIES)
    parser.add_argument("model")
    parser.add_argument("stages", nargs="+", choices=STAGES)
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args(argv)
    for stage in options.stages:
        run = Run(stage, options.folder / stage, model=options.model, strategy=options.strategy,
                  kill_after_step=options.kill_after, resume=options.resume, batch_size=1)
        state = train(run)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(state, run.folder / f"result-{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
