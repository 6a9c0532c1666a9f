"""One SGD step of SFT on 8 fixed variable-length chats; saves the updated weights.

Run as a script (`python tests/ddp_one_step.py OUT DEVICES`) because Lightning's DDP launcher
starts the other processes by re-running the command line.
"""

import sys

import lightning as L
import torch

from plpost import ChatDataModule, SFTModule


def rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": "4" * (3 * i + 1)}]}
        for i in range(8)
    ]


def sgd(params):
    return torch.optim.SGD(params, lr=1.0)


def main(out: str, devices: int) -> None:
    L.seed_everything(0)
    module = SFTModule("plpost:tiny", optimizer=sgd)
    data = ChatDataModule("plpost:tiny", train=rows(), batch_size=8 // devices, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in module.policy.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
