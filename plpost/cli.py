"""The `plpost` command: a stock LightningCLI over plpost's stage modules and data modules."""

from __future__ import annotations

import importlib
import sys

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger


class LogConfigToLogger(SaveConfigCallback):
    """Writes config.yaml next to the run and records the full config in the logger (e.g. W&B)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, Logger):
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            trainer.logger.log_hyperparams({"config": config})


class PostTrainingCLI(LightningCLI):
    """`fit/validate/test/predict`, `--config`, `--print_config`, `class_path/init_args`.

    Optimizers and schedulers are injected into the module (`model.init_args.optimizer`,
    `model.init_args.scheduler`) because models are built lazily in `configure_model`. The
    tokenizer is given once, on the data module, and linked to the model.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_callback", LogConfigToLogger)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")


COMMANDS = {
    "demo": ("plpost.demo", "the whole pipeline on the bundled tiny model, measured (plpost demo --help)"),
    "chat": ("plpost.chat", "talk to a model: export folder, Hub name, plpost:tiny or checkpoint (plpost chat --help)"),
    "export": ("plpost.export", "a Lightning checkpoint of any stage to a Hugging Face folder (plpost export --help)"),
}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] and argv[0] in COMMANDS:
        importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
        return
    if argv[:1] in (["-h"], ["--help"]):
        print("plpost commands besides LightningCLI's fit / validate / test / predict:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<8} {summary}")
        print()
    PostTrainingCLI(args=args)


if __name__ == "__main__":
    main()
