"""The loss and gradients of the first optimizer step of a stage, on 8 variable-length records.

Imported by test_invariance.py for single-process layouts, and run as a script for DDP or FSDP2
sharding (`python tests/reliability/first_step.py OUT DEVICES [ddp|sharded]`), because Lightning's
launcher starts the other processes by re-running the command line. The script runs every stage
in one launch.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from plpost import ChatDataModule, DPOModule, FeedbackDataModule, KTOModule, PreferenceDataModule, RewardModule, SFTModule

TINY = "plpost:tiny"
RECORDS = 8


def chats() -> list[dict]:
    """Answers of 1 to 22 characters, a second turn on every third: token counts differ a lot."""
    rows = []
    for i in range(RECORDS):
        turns = [f"{i}+{i}", "4" * (3 * i + 1)] + (["and again?", "12"] if i % 3 == 0 else [])
        rows.append({"messages": [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(turns)]})
    return rows


def pairs() -> list[dict]:
    """Prompts and completions of different lengths, so both halves of a batch are padded."""
    return [
        {
            "prompt": [{"role": "user", "content": f"{i}+{i * 7}" + "?" * (i % 3)}],
            "chosen": [{"role": "assistant", "content": "7" * (i + 1)}],
            "rejected": [{"role": "assistant", "content": "3" * (RECORDS - i) + "9" * (i % 2)}],
        }
        for i in range(RECORDS)
    ]


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def chat_data(batch_size: int) -> ChatDataModule:
    return ChatDataModule(TINY, train=chats(), batch_size=batch_size, shuffle=False)


def pair_data(batch_size: int) -> PreferenceDataModule:
    return PreferenceDataModule(TINY, train=pairs(), batch_size=batch_size, shuffle=False)


def feedback_data(batch_size: int) -> FeedbackDataModule:
    """One labelled completion per record: the chosen of the even pairs, the rejected of the odd ones."""
    rows = [{"prompt": pair["prompt"], "completion": pair["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
            for i, pair in enumerate(pairs())]
    return FeedbackDataModule(TINY, train=rows, batch_size=batch_size, shuffle=False)


STAGES = {  # a stage: (its module, its data module for a micro-batch size)
    "sft": (lambda: SFTModule(TINY, optimizer=sgd), chat_data),
    "reward": (lambda: RewardModule(TINY, optimizer=sgd), pair_data),
    "dpo": (lambda: DPOModule(TINY, optimizer=sgd), pair_data),
    # The NLL per chosen token of the whole step; at step 0, KTO's z0 is 0 in every micro-batch.
    "orpo": (lambda: DPOModule(TINY, loss_type="orpo", reference="none", optimizer=sgd), pair_data),
    "kto": (lambda: KTOModule(TINY, undesirable_weight=1.5, optimizer=sgd), feedback_data),
}


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole, on every rank (a collective); any other as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class StepCapture(L.Callback):
    """The step's loss (summed over micro-batches and ranks), its gradients after DDP's all-reduce
    (or FSDP2's reduce-scatter), and the weights the step leaves."""

    def __init__(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64)
        self.result: dict | None = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # Lightning hands over the training_step loss divided by accumulate_grad_batches; the
        # stages multiply it by accumulate * world size (loss_scale), so this sums to the step's loss.
        self.loss += loss.detach().double() / trainer.world_size

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.result is None:
            loss = trainer.strategy.reduce(self.loss, reduce_op="sum")
            gradients = {n: whole(p.grad.detach()).clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            self.result = {"loss": loss, "gradients": gradients}

    def on_train_end(self, trainer, pl_module) -> None:
        self.result["weights"] = {n: whole(p.detach()).clone() for n, p in pl_module.named_parameters() if p.requires_grad}


STRATEGIES = {
    "ddp": lambda: "ddp",
    "sharded": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"),
}


def first_step(stage: str, batch_size: int, accumulate: int = 1, devices: int = 1, strategy: str = "ddp") -> dict:
    L.seed_everything(0, verbose=False)  # the reward head starts from the same random weights
    module, data = STAGES[stage]
    capture = StepCapture()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=STRATEGIES[strategy]() if devices > 1 else "auto", max_steps=1,
        accumulate_grad_batches=accumulate, callbacks=[capture], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module(), data(batch_size))
    return capture.result


def main(out: str, devices: int, strategy: str) -> None:
    # Each process holds 8 / devices records, as micro-batches of 3 and 1: the step's records are
    # spread unevenly over micro-batches as well as over processes.
    results = {stage: first_step(stage, 3, accumulate=2, devices=devices, strategy=strategy) for stage in STAGES}
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ddp")
