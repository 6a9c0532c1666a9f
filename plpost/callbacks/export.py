"""HFExport: writes the trained model as a Hugging Face folder that transformers and peft load as is."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from plpost.generation import stop_token_ids
from plpost.quiet import no_progress_bars_if_small


class HFExport(L.Callback):
    """Saves the module's exported model (safetensors), its tokenizer and generation config.

    Full models are written as `save_pretrained` folders. A LoRA policy is written as a PEFT
    adapter folder (`PeftModel.from_pretrained(base, dirpath)`), or, with
    `lora.merge_on_export`, merged into a full model (merging works on a copy, so training and
    testing can go on with the adapter).

    Args:
        dirpath: the folder to write.
        every_n_epochs: also export after every n-th training epoch (0: only when training ends).
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 0) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_hf_folder(pl_module, self.dirpath)
            rank_zero_info(f"exported to {self.dirpath}")
        trainer.strategy.barrier("plpost-export")


def write_hf_folder(pl_module: L.LightningModule, dirpath: Path) -> None:
    """The module's `export_model()` and tokenizer as a Hugging Face folder (what `HFExport` and
    `plpost export` write): a PEFT adapter folder for a LoRA policy unless `lora.merge_on_export`,
    and a generation config that stops at every end-of-turn token."""
    model = pl_module.export_model()
    tokenizer = pl_module.tokenizer
    lora = getattr(pl_module, "lora", None)
    if lora is not None and lora.merge_on_export:
        model = copy.deepcopy(model).merge_and_unload()
    dirpath.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.eos_token_id = stop_token_ids(tokenizer)
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    with no_progress_bars_if_small(sum(p.numel() * p.element_size() for p in model.parameters())):
        model.save_pretrained(dirpath, safe_serialization=True)
    tokenizer.save_pretrained(dirpath)
