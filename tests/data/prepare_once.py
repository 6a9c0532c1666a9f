"""One DDP step of SFT on two CPU processes; each rank writes how many records it tokenized.

Run as a script (`python tests/data/prepare_once.py OUT CACHE`) because Lightning's DDP launcher
starts the other process by re-running the command line.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

from plpost import ChatDataModule, SFTModule


class CountingChatDataModule(ChatDataModule):
    tokenized = 0

    def preprocess(self, source, index, row):
        CountingChatDataModule.tokenized += 1
        return super().preprocess(source, index, row)


def main(out: str, cache: str) -> None:
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(16)]
    data = CountingChatDataModule("plpost:tiny", train=rows, batch_size=4, cache_dir=cache, num_proc=1)
    module = SFTModule("plpost:tiny", optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    report = {"pid": os.getpid(), "tokenized": CountingChatDataModule.tokenized,
              "examples": type(data.train_examples).__name__, "folder": str(data.train_examples.folder)}
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
