"""HFExport: writes the trained model as a Hugging Face folder that transformers and peft load as is,
with a model card, and pushes it to the Hub on request."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch import Tensor, nn
from lightning.pytorch.utilities import rank_zero_info

from plpost.generation import stop_token_ids
from plpost.hub import check_push_possible, describe_source, model_card, push_folder
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
        dtype: the dtype of a full model's weights ("float32", "bfloat16", "float16"); default:
            the dtype the starting checkpoint is stored in (a bfloat16 checkpoint trained with
            float32 master weights is written in bfloat16, as its users load it), and the trained
            dtype for `random_init`. Adapter folders keep the adapters as trained.
        push_to_hub: when training ends, upload the folder to the Hub model repo `hub_repo_id`
            (`huggingface_hub.HfApi.upload_folder`). A push that cannot succeed (no or a bad repo
            id, HF_HUB_OFFLINE, no token) stops the run in `setup`, before training.
        hub_repo_id: the repo, "namespace/name"; created if missing.
        hub_private: create it private (an existing repo keeps its visibility).
        hub_revision: the branch to push to (created from main if missing); None: main.

    Every folder gets a model card (README.md): the stage, the starting model, the data, the
    stage's settings and the last value of each logged metric. The card's data and metrics are
    also kept in checkpoints, so `plpost export` writes the same card from a checkpoint.
    """

    needs_full_weights = True
    """It writes the whole policy (see `plpost.sharding.check_strategy`)."""

    def __init__(
        self, dirpath: str, every_n_epochs: int = 0, dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        push_to_hub: bool = False, hub_repo_id: str | None = None, hub_private: bool = False,
        hub_revision: str | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.dtype = dtype
        self.push_to_hub = push_to_hub
        self.hub_repo_id = hub_repo_id
        self.hub_private = hub_private
        self.hub_revision = hub_revision
        self.record: dict[str, Any] = {}
        self.trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer
        if self.push_to_hub and stage == "fit":
            check_push_possible(self.hub_repo_id, self.dirpath)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)
        if self.push_to_hub and trainer.is_global_zero:
            url = push_folder(self.dirpath, self.hub_repo_id, private=self.hub_private, revision=self.hub_revision)
            rank_zero_info(f"pushed {self.dirpath} to {url}")
        trainer.strategy.barrier("plpost-push")

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = gathered_state(pl_module.export_model())  # every rank takes part in the gathering
        if trainer.is_global_zero:
            write_hf_folder(pl_module, self.dirpath, state, dtype=self.dtype)
            write_model_card(pl_module, self.dirpath, self.training_record(trainer))
            rank_zero_info(f"exported to {self.dirpath}")
        trainer.strategy.barrier("plpost-export")

    def training_record(self, trainer: L.Trainer) -> dict[str, Any]:
        """What the card says of the run besides the module's settings: the data, the last logged
        metrics and the optimizer step."""
        data = trainer.datamodule
        self.record = {
            "data": {"data module": type(data).__name__ if data is not None else None,
                     "train": describe_source(getattr(data, "train_source", None)),
                     "validation": describe_source(getattr(data, "val_source", None))},
            "metrics": {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1},
            "step": trainer.global_step,
        }
        return self.record

    def state_dict(self) -> dict[str, Any]:
        # Called as a checkpoint is written: the checkpoint's own step and metrics, for `plpost export`.
        if self.trainer is not None:
            self.training_record(self.trainer)
        return {"record": self.record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record = state_dict.get("record", {})


def write_model_card(pl_module: L.LightningModule, dirpath: Path, record: dict[str, Any]) -> None:
    """README.md in `dirpath`: the card of `plpost.hub.model_card` for this module and run record."""
    settings = {name: value for name, value in dict(pl_module.hparams).items() if not name.startswith("_")}
    model_settings = getattr(pl_module, "model_settings", None)
    lora = model_settings.lora if model_settings is not None else None
    text = model_card(
        stage=type(pl_module).__name__, base_model=pl_module.model_name, settings=settings, data=record.get("data"),
        metrics=record.get("metrics"), step=record.get("step"), adapter=lora is not None and not lora.merge_on_export,
    )
    (dirpath / "README.md").write_text(text)


def gathered_state(model: nn.Module) -> dict[str, Tensor] | None:
    """The full state dict of a model sharded with FSDP2, gathered onto rank 0 (the other ranks
    get an empty dict); None for a model that is not sharded. A collective: every rank calls it."""
    from plpost.sharding import full_state_dict, is_sharded

    if not any(is_sharded(m) for m in model.modules()):
        return None
    state = full_state_dict(model)
    # Tied weights (a head sharing the input embedding) arrive as separate copies, which
    # save_pretrained would write twice; it writes one name for one shared tensor.
    for name in tied_aliases(model):
        state.pop(name, None)
    return state


def tied_aliases(model: nn.Module) -> set[str]:
    """The state dict names of `model` that name a tensor an earlier name holds already (tied weights)."""
    first_name: dict[int, str] = {}
    return {name for name, tensor in model.state_dict(keep_vars=True).items()
            if first_name.setdefault(id(tensor), name) != name}


def unsharded_copy(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A plain (unsharded) model of `model`'s class and config, LoRA adapters included, holding the
    gathered `state`: what LoRA merging works on, since a sharded model's weights are not whole."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(iter(state.values())).dtype
    copy_ = type(base)._from_config(base.config, torch_dtype=dtype)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        copy_ = get_peft_model(copy_, model.peft_config[model.active_adapter])
    loaded = copy_.load_state_dict(state, strict=False)
    if set(loaded.missing_keys) - tied_aliases(copy_) or loaded.unexpected_keys:
        raise RuntimeError(f"the gathered weights do not fit {type(copy_).__name__}: missing "
                           f"{loaded.missing_keys[:5]}, unexpected {loaded.unexpected_keys[:5]}")
    return copy_


def export_dtype(pl_module: L.LightningModule, requested: str | None) -> str | None:
    """The dtype name full-model exports are written in: `requested`, else the one the starting
    checkpoint is stored in (None, as trained, for `random_init` or a checkpoint that names none)."""
    from plpost.precision import stored_dtype

    settings = getattr(pl_module, "model_settings", None)
    if requested is not None or settings is None or settings.random_init:
        return requested
    return stored_dtype(pl_module.model_name, trust_remote_code=settings.trust_remote_code)


def write_hf_folder(
    pl_module: L.LightningModule, dirpath: Path, state: dict[str, Tensor] | None = None, *, dtype: str | None = None
) -> None:
    """The module's `export_model()` and tokenizer as a Hugging Face folder (what `HFExport` and
    `plpost export` write): a PEFT adapter folder for a LoRA policy unless `lora.merge_on_export`,
    and a generation config that stops at every end-of-turn token. `state`: the model's full state
    dict when it is sharded (see `gathered_state`), written in place of its own shards.
    `dtype`: a full model's weights' dtype (see `export_dtype`)."""
    from plpost.hf import DTYPES

    model = pl_module.export_model()
    tokenizer = pl_module.tokenizer
    settings = getattr(pl_module, "model_settings", None)
    lora = settings.lora if settings is not None else None
    if lora is not None and lora.merge_on_export:
        model = unsharded_copy(model, state) if state is not None else copy.deepcopy(model)
        model, state = model.merge_and_unload(), None
    dirpath.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.eos_token_id = stop_token_ids(tokenizer)
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    full_model = base is model
    written = export_dtype(pl_module, dtype) if full_model else None
    if written is not None:
        state = cast_floating(state if state is not None else own_state(model), DTYPES[written])
    with no_progress_bars_if_small(sum(p.numel() * p.element_size() for p in model.parameters())):
        model.save_pretrained(dirpath, safe_serialization=True, state_dict=state)
    if written is not None:  # save_pretrained records the dtype of the model in memory
        trained = model.config.dtype
        model.config.dtype = written
        model.config.save_pretrained(dirpath)
        model.config.dtype = trained
    tokenizer.save_pretrained(dirpath)


def own_state(model: nn.Module) -> dict[str, Tensor]:
    """`model`'s state dict without the second names of tied weights (see `gathered_state`)."""
    aliases = tied_aliases(model)
    return {name: tensor for name, tensor in model.state_dict().items() if name not in aliases}


def cast_floating(state: dict[str, Tensor], dtype) -> dict[str, Tensor]:
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}
