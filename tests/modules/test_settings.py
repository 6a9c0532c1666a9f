"""Model settings as one typed object: every stage takes the same `model_settings`, the spelling
from before it (settings at the stage's top level) is refused with the new one named, and
checkpoints written with that spelling still rebuild their module."""

import inspect

import lightning as L
import pytest
import yaml
from conftest import TINY, cli_signature

import plpost
from plpost.callbacks import HFExport
from plpost.cli import main, moved_settings
from plpost.data.chat import ChatDataModule
from plpost.modules import LoraSettings, ModelSettings, PostTrainingModule, SFTModule
from plpost.modules.settings import MOVED_TO_MODEL_SETTINGS, settings_from_flat

STAGES = [getattr(plpost, name) for name in plpost.__all__ if issubclass(getattr(plpost, name), PostTrainingModule)]


def test_moved_names_are_the_fields_of_model_settings():
    assert MOVED_TO_MODEL_SETTINGS == tuple(inspect.signature(ModelSettings).parameters)
    assert set(MOVED_TO_MODEL_SETTINGS) >= {"dtype", "lora", "torch_compile", "gradient_checkpointing"}


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_every_stage_takes_the_same_model_settings_and_none_of_its_fields(stage):
    """A new setting is one field of ModelSettings: no stage repeats a field as its own argument."""
    parameters = cli_signature(stage).parameters
    assert parameters["model_settings"].annotation is ModelSettings
    assert parameters["model_settings"].default == ModelSettings()
    assert not set(parameters) & set(MOVED_TO_MODEL_SETTINGS)


def test_the_old_spelling_is_refused_with_the_new_one_named(tmp_path):
    config = {"model": {"class_path": "plpost.SFTModule", "init_args": {"model": TINY, "lora": {"r": 8},
                                                                        "torch_compile": True}}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    found = moved_settings(["fit", "--config", str(path), "--model.init_args.dtype=bfloat16", "--model.lora.r=4"])
    assert found == [
        f"{path}: model.init_args.lora is now model.init_args.model_settings.lora",
        f"{path}: model.init_args.torch_compile is now model.init_args.model_settings.torch_compile",
        "--model.init_args.dtype: now --model.init_args.model_settings.dtype",
        "--model.lora.r: now --model.model_settings.lora.r",
    ]
    with pytest.raises(SystemExit, match="moved into one `model_settings` block"):
        main(["fit", f"--config={path}"])
    assert moved_settings(["fit", "--model.init_args.model_settings.lora.r=8", "--trainer.max_steps=3"]) == []


def test_the_shared_default_is_never_changed_in_place(tmp_path):
    """One `ModelSettings()` is every stage's default; exporting with another dtype or merge choice
    replaces a module's settings rather than editing that shared object."""
    module = SFTModule(TINY)
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[HFExport(str(tmp_path / "model"))]).fit(
        module, ChatDataModule(TINY, train="plpost:data/addition/sft.jsonl", batch_size=2, max_length=32))
    assert cli_signature(SFTModule).parameters["model_settings"].default == ModelSettings()


def test_hyperparameters_saved_one_by_one_rebuild_the_module():
    """A checkpoint written before `model_settings` holds each setting under its own name."""
    old = {"model": TINY, "tokenizer": None, "lora": LoraSettings(r=4), "dtype": "float32", "_class_path": "x"}
    module = SFTModule.from_hyperparameters(old)
    assert module.model_settings == ModelSettings(lora=LoraSettings(r=4), dtype="float32")
    assert settings_from_flat({"model": TINY}) == {"model": TINY}
