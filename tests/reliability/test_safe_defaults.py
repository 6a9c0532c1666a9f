"""Safe defaults: no remote code unless asked, safetensors only on export, nothing read back with
pickle's full power, checkpoints written atomically, and no secrets from the environment in
saved configs, hyperparameters or logs."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from conftest import TINY
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

import plpost
from plpost import ChatDataModule, DPOModule, PreferenceDataModule, RewardModule, SFTModule
from plpost.callbacks.export import write_hf_folder
from plpost.checkpointing import AtomicCheckpointIO, write_atomically
from plpost.cli import PostTrainingCLI
from plpost.modules import ModelSettings, LoraSettings

PACKAGE = Path(plpost.__file__).parent
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts)


def plpost_callables():
    """Every class and function defined in plpost, with the module it lives in."""
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="plpost."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", value


def test_trust_remote_code_defaults_to_false_everywhere():
    checked = []
    for name, value in plpost_callables():
        try:
            parameters = inspect.signature(value).parameters
        except (TypeError, ValueError):
            continue
        if "trust_remote_code" in parameters:
            assert parameters["trust_remote_code"].default is False, name
            checked.append(name)
    assert {"plpost.hf.load_tokenizer", "plpost.hf.load_causal_lm", "plpost.modules.settings.ModelSettings",
            "plpost.data.chat.ChatDataModule"} <= set(checked)
    for path in SOURCES:
        assert "trust_remote_code=True" not in path.read_text(), path


def test_models_and_tokenizers_load_without_remote_code_by_default(monkeypatch):
    """Every from_pretrained / from_config that the stages and data modules call gets trust_remote_code=False."""
    seen = []
    for auto in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM,
                 transformers.AutoModelForSequenceClassification):
        for method in ("from_pretrained", "from_config"):
            if not hasattr(auto, method):
                continue
            original = getattr(auto, method)

            def recording(*args, _original=original, _name=f"{auto.__name__}.{method}", **kwargs):
                seen.append((_name, kwargs.get("trust_remote_code", False)))
                return _original(*args, **kwargs)

            monkeypatch.setattr(auto, method, recording)
    for module in (SFTModule(TINY), RewardModule(TINY), DPOModule(TINY), SFTModule(TINY, model_settings=ModelSettings(random_init=True))):
        module.configure_model()
        module.tokenizer
    ChatDataModule(TINY, train=[{}]).tokenizer
    PreferenceDataModule(TINY, train=[{}]).tokenizer
    assert {name for name, _ in seen} >= {"AutoTokenizer.from_pretrained", "AutoConfig.from_pretrained",
                                           "AutoModelForCausalLM.from_pretrained", "AutoModelForCausalLM.from_config",
                                           "AutoModelForSequenceClassification.from_pretrained"}
    assert [call for call in seen if call[1] is not False] == []


@pytest.mark.parametrize("kind", ["full", "lora-adapter", "lora-merged", "reward"])
def test_export_writes_safetensors_and_nothing_pickled(tmp_path, kind):
    lora = {"full": None, "reward": None, "lora-adapter": LoraSettings(r=2, alpha=4),
            "lora-merged": LoraSettings(r=2, alpha=4, merge_on_export=True)}[kind]
    module = (RewardModule if kind == "reward" else SFTModule)(TINY, model_settings=ModelSettings(lora=lora))
    module.configure_model()
    write_hf_folder(module, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert any(name.endswith(".safetensors") for name in files), files
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], files


def test_everything_plpost_reads_back_with_torch_load_is_weights_only():
    """Every torch.load call in the package passes weights_only=True, and nothing uses pickle."""
    calls = 0
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("weights_only") == "True", f"{path}:{node.lineno}"
                calls += 1
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "joblib", "cloudpickle"} & set(names), f"{path}:{node.lineno}"
    assert calls >= 1  # the reference cache is read back


def test_a_lora_run_resumes_from_its_checkpoint_with_weights_only_loading(tmp_path):
    """Lightning reads checkpoints with torch.load's default weights_only=True; the hyperparameters
    hold a LoraSettings, which plpost allowlists, so such a run can resume."""
    rows = [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(4)]

    def fit(steps: int, ckpt_path=None) -> L.Trainer:
        trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.fit(SFTModule(TINY, model_settings=ModelSettings(lora=LoraSettings(r=2, alpha=4))), ChatDataModule(TINY, train=rows, batch_size=2),
                    ckpt_path=ckpt_path)
        return trainer

    first = fit(1)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["model_settings"].lora == LoraSettings(r=2, alpha=4)
    assert isinstance(first.strategy.checkpoint_io, AtomicCheckpointIO)  # the stage installed it
    assert fit(2, checkpoint).global_step == 2


# -- atomic writes ----------------------------------------------------------------------------
def failing_save(obj, handle, *args, **kwargs):
    """Writes the first bytes of a real checkpoint, then fails as a full disk would."""
    handle.write(b"PK\x03\x04 partial")
    raise OSError(28, "No space left on device")


@pytest.fixture
def previous(tmp_path) -> Path:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "weights": torch.arange(5.0)}, path)
    return path


def test_a_failing_write_leaves_the_previous_checkpoint_whole(previous, monkeypatch):
    before = previous.read_bytes()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 5, "weights": torch.ones(5)}, previous)
    monkeypatch.undo()
    assert previous.read_bytes() == before
    assert AtomicCheckpointIO().load_checkpoint(previous, weights_only=True)["global_step"] == 4
    assert [p.name for p in previous.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_the_same_failure_corrupts_a_checkpoint_written_in_place(previous, monkeypatch):
    """Negative control: writing over the file itself, the failure above leaves a file that does
    not load, so the test above does tell atomic writes from in-place ones."""
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError), previous.open("wb") as handle:
        torch.save({"global_step": 5}, handle)
    monkeypatch.undo()
    with pytest.raises(Exception):
        torch.load(previous, weights_only=True)


def test_atomic_writes_are_the_default_and_a_users_checkpoint_io_is_kept(tmp_path):
    """The stages replace only Lightning's plain TorchCheckpointIO (what a Trainer uses unless told
    otherwise); a CheckpointIO the user chose, e.g. asynchronous saving, stays."""

    class Mine(TorchCheckpointIO):
        pass

    rows = [{"prompt": "1+1=", "completion": "2"}] * 2
    for plugins, expected in (([], AtomicCheckpointIO), ([Mine()], Mine), ([AsyncCheckpointIO()], AsyncCheckpointIO)):
        trainer = L.Trainer(max_steps=1, plugins=plugins, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(SFTModule(TINY), ChatDataModule(TINY, train=rows, batch_size=2))
        assert type(trainer.strategy.checkpoint_io) is expected


def test_stale_temporary_files_of_a_killed_write_are_removed_by_the_next(tmp_path):
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half")
    write_atomically(tmp_path / "last.ckpt", lambda handle: handle.write(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and (tmp_path / "last.ckpt").read_bytes() == b"whole"


# -- secrets ----------------------------------------------------------------------------------
SECRETS = {"WANDB_API_KEY": "wandb-secret-5f0c2a9e71d4", "HF_TOKEN": "hf_secretTokenQz81Lm"}


LOGGERS = {
    "csv": ("lightning.pytorch.loggers.CSVLogger", "{{save_dir: {run}, name: logs}}"),
    "wandb": ("lightning.pytorch.loggers.WandbLogger", "{{save_dir: {run}, project: plpost-test, offline: true}}"),
}


@pytest.mark.parametrize("logger", [pytest.param("csv"), pytest.param("wandb", marks=pytest.mark.slow)])
def test_no_secret_from_the_environment_reaches_the_logged_config_or_any_file_of_the_run(tmp_path, monkeypatch, logger):
    """A CLI run with the secrets set: the config LogConfigToLogger hands the logger, and every file
    the run writes (config.yaml, CSVLogger's hparams.yaml and metrics, W&B's offline run, the
    checkpoint) must not contain their values."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    logged = []
    logger_class, logger_args = LOGGERS[logger]
    module_name, class_name = logger_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    original = cls.log_hyperparams

    def recording(self, params, *args, **kwargs):
        logged.append(params)
        return original(self, params, *args, **kwargs)

    monkeypatch.setattr(cls, "log_hyperparams", recording)
    run = tmp_path / "run"
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n' * 4)
    config = tmp_path / "run.yaml"
    config.write_text(f"""
trainer:
  max_steps: 1
  enable_progress_bar: false
  default_root_dir: {run}
  logger:
    class_path: {logger_class}
    init_args: {logger_args.format(run=run)}
model:
  class_path: plpost.SFTModule
  init_args: {{model: "plpost:tiny"}}
data:
  class_path: plpost.ChatDataModule
  init_args: {{tokenizer: "plpost:tiny", train: {data}, batch_size: 2}}
""")
    cli = PostTrainingCLI(args=["fit", f"--config={config}"])
    assert cli.trainer.global_step == 1
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the CLI's runs write atomically too
    if logger == "wandb":
        import wandb

        wandb.finish()
    handed = repr(logged)
    assert "plpost.SFTModule" in handed  # the whole config was logged, so its check below means something
    written = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert "config.yaml" in names and any(n.endswith(".ckpt") for n in names), names
    if logger == "csv":
        assert "plpost.SFTModule" in next(p for p in written if p.name == "hparams.yaml").read_text()
    for name, value in SECRETS.items():
        assert value not in handed, f"{name} was handed to the logger"
        for path in written:
            assert value.encode() not in path.read_bytes(), f"{name} leaked into {path}"
