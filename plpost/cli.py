"""The `plpost` command: a stock LightningCLI over plpost's stage modules and data modules."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from plpost.modules.settings import MOVED_TO_MODEL_SETTINGS


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


def moved_settings(argv: list[str]) -> list[str]:
    """Where `argv` (its `--config` files and its flags) writes a model setting at the stage's top
    level, the spelling from before `model_settings`: one line each, naming the new spelling."""
    found = []
    for index, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in ("--config", "-c"):
            path = value or (argv[index + 1] if index + 1 < len(argv) else "")
            config = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
            model = config.get("model") if isinstance(config, dict) else None
            init_args = model.get("init_args", {}) if isinstance(model, dict) else {}
            found += [f"{path}: model.init_args.{key} is now model.init_args.model_settings.{key}"
                      for key in init_args if key in MOVED_TO_MODEL_SETTINGS]
        for prefix in ("--model.init_args.", "--model."):
            key = name.removeprefix(prefix).split(".")[0] if name.startswith(prefix) else None
            if key in MOVED_TO_MODEL_SETTINGS:
                found.append(f"{name}: now {prefix}model_settings.{name.removeprefix(prefix)}")
                break
    return found


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
    moved = moved_settings(argv)
    if moved:
        raise SystemExit("the model settings moved into one `model_settings` block (see docs/configuration.md):\n  "
                         + "\n  ".join(moved))
    PostTrainingCLI(args=args)


if __name__ == "__main__":
    main()
