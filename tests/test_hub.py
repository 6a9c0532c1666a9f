"""The model card of every exported folder, and pushing to the Hub.

The suite runs offline (HF_HUB_OFFLINE=1, no network), so no test uploads anything: the target the
tests read is the local folder the export writes, which is exactly what `push_folder` uploads
(card included). The push itself is exercised through huggingface_hub's real `HfApi` up to its
first request, which offline mode refuses; every refusal is checked to come before training, or
before the export is built, and to say how to push later.
"""

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY

from plpost import ChatDataModule, SFTModule
from plpost.callbacks import HFExport
from plpost.cli import main
from plpost.hub import HubPushError, check_push_possible, model_card, push_folder

SFT_DATA = "plpost:data/addition/sft.jsonl"


def fit(tmp_path, **export):
    L.seed_everything(0)
    module = SFTModule(TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatDataModule(TINY, train=SFT_DATA, batch_size=16, max_length=32)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[HFExport(str(tmp_path / "export"), **export)], default_root_dir=tmp_path)
    trainer.fit(module, data)
    return trainer, tmp_path / "export"


def card_sections(text: str) -> tuple[dict, str]:
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_the_card_names_the_stage_data_settings_and_last_metrics(tmp_path):
    """After 2 SFT steps the card's results table holds the last logged value of each metric
    (read back from the trainer), its settings block parses back to the module's hyperparameters,
    and its data section names the training file."""
    trainer, folder = fit(tmp_path)
    metadata, body = card_sections((folder / "README.md").read_text())
    assert metadata["library_name"] == "transformers" and metadata["tags"] == ["plpost", "SFTModule"]
    assert "base_model" not in metadata  # plpost:tiny is no Hub repo
    assert "# SFTModule of plpost:tiny" in body and f"- train: `{SFT_DATA}`" in body
    assert "- data module: `ChatDataModule`" in body
    settings = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert settings["model"] == TINY and settings["model_settings"]["lora"] is None
    assert trainer.callback_metrics, "the run logged metrics"
    for name, value in trainer.callback_metrics.items():
        assert f"| {name} | {float(value):.6g} |" in body
    assert "(at optimizer step 2)" in body


def test_a_hub_base_model_and_an_adapter_are_named_in_the_metadata():
    text = model_card(stage="GRPOModule", base_model="Qwen/Qwen3-0.6B", settings={"beta": 0.0}, adapter=True)
    metadata, body = card_sections(text)
    assert metadata["base_model"] == "Qwen/Qwen3-0.6B" and metadata["library_name"] == "peft"
    assert "PeftModel.from_pretrained" in body and "No metrics were recorded." in body and "Not recorded." in body


def test_a_push_that_cannot_succeed_stops_before_training(tmp_path):
    """Offline, push_to_hub refuses in setup: no optimizer step is taken and no folder is written."""
    with pytest.raises(HubPushError, match="offline mode"):
        fit(tmp_path, push_to_hub=True, hub_repo_id="someone/tiny-sft")
    assert not (tmp_path / "export").exists()
    with pytest.raises(HubPushError, match="needs hub_repo_id"):
        fit(tmp_path, push_to_hub=True)
    with pytest.raises(HubPushError, match="not a Hub repo id"):
        check_push_possible("no such//repo")


def test_without_a_token_the_push_is_refused(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        check_push_possible("someone/tiny-sft")


def test_the_upload_goes_through_huggingface_hub_and_fails_clearly_offline(tmp_path):
    """push_folder calls HfApi itself (create_repo first); offline, huggingface_hub refuses that
    request, and the error names the repo and the way to push the written folder later."""
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(HubPushError, match=r"someone/tiny-sft failed: .*offline.*hf upload <repo_id>") as error:
        push_folder(tmp_path, "someone/tiny-sft", private=True, revision="v1")
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert isinstance(error.value.__cause__, OfflineModeIsEnabled)


def test_plpost_export_refuses_a_push_before_building_anything(tmp_path, capsys):
    """The checkpoint path need not even exist: the push is checked first."""
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "out"), "--push-to-hub", "someone/tiny-sft",
              "--private", "--revision", "v1"])
    assert exit_.value.code == 2 and "offline mode" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
