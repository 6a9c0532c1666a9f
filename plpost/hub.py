"""The model card of an exported folder, and pushing the folder to the Hugging Face Hub.

The card (README.md in the folder) says what the run was: the stage, the model it started from,
the data, the stage's settings and the last metrics it logged. `HFExport` and `plpost export`
write it into every folder they write; with `push_to_hub` the very folder, card included, is
uploaded with `huggingface_hub.HfApi` (`create_repo`, `create_branch` for a revision, then
`upload_folder`). What can be checked without the network (the repo id, offline mode, a token) is
checked before training starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["HubPushError", "check_push_possible", "describe_source", "model_card", "push_folder"]


class HubPushError(RuntimeError):
    """The folder cannot be pushed; the message says why and how to push it later."""


def later(folder: Path | str | None) -> str:
    where = f"the folder {folder}" if folder is not None else "the exported folder"
    return f"{where} is written all the same; push it later with `hf upload <repo_id> {folder or '<folder>'}`"


def check_push_possible(repo_id: str | None, folder: Path | str | None = None) -> None:
    """Refuses a push that cannot succeed, before any training: no or a malformed repo id, the
    Hub in offline mode (HF_HUB_OFFLINE), or no token (`hf auth login` or HF_TOKEN)."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id:
        raise HubPushError("push_to_hub needs hub_repo_id (e.g. your-name/qwen-sft)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"hub_repo_id {repo_id!r} is not a Hub repo id: {error}") from None
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(f"cannot push to {repo_id}: the Hub is in offline mode (HF_HUB_OFFLINE is set); unset it "
                           f"to push, or leave push_to_hub off ({later(folder)})")
    if get_token() is None:
        raise HubPushError(f"cannot push to {repo_id}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN")


def push_folder(folder: Path | str, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None) -> str:
    """Uploads `folder` to the model repo `repo_id` (created if missing, `private` then; an
    existing repo keeps its visibility), on the branch `revision` (created from main if missing;
    None: main). Returns the commit's URL. Raises HubPushError when the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type="model",
                                   commit_message=commit_message or f"plpost export of {Path(folder).name}")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise HubPushError(f"pushing {folder} to {repo_id} failed: {error} ({later(folder)})") from error
    return commit.commit_url


def describe_source(source: Any) -> str | None:
    """A data source as the card names it: a file or Hub name as given, rows given in code by count."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (list, tuple)):
        return f"{len(source)} rows given in code"
    return type(source).__name__


def is_hub_name(name: str) -> bool:
    """A name that looks like a Hub repo (namespace/name), not a local folder or a bundled asset."""
    return name.count("/") == 1 and not name.startswith((".", "/", "plpost:")) and not Path(name).exists()


def model_card(
    *, stage: str, base_model: str, settings: dict[str, Any], data: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None, step: int | None = None, adapter: bool = False,
) -> str:
    """The README.md text: Hub metadata (library, base model, tags), then the stage, the data, the
    settings (as YAML) and the measured results (the last value of each logged metric)."""
    from huggingface_hub import ModelCardData

    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers", tags=["plpost", stage],
        base_model=base_model if is_hub_name(base_model) else None,
    )
    lines = ["---", card_data.to_yaml(), "---", "", f"# {stage} of {base_model}", "",
             f"Trained with plpost's `{stage}` from `{base_model}`"
             + (" as a LoRA adapter (load it with `peft.PeftModel.from_pretrained`)." if adapter else "."), ""]
    lines += ["## Data", ""]
    described = {name: value for name, value in (data or {}).items() if value is not None}
    lines += [f"- {name}: `{value}`" for name, value in described.items()] or ["Not recorded."]
    lines += ["", "## Settings", "", "```yaml", yaml.safe_dump(plain(settings), sort_keys=True).rstrip(), "```", ""]
    lines += ["## Results", ""]
    if metrics:
        lines += [f"The last logged value of each metric{f' (at optimizer step {step})' if step is not None else ''}:",
                  "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())]
    else:
        lines += ["No metrics were recorded."]
    return "\n".join(lines) + "\n"


def plain(value: Any) -> Any:
    """`value` as YAML-safe data: dataclasses as dicts, classes and callables by their import path."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    target = value if isinstance(value, type) or callable(value) else type(value)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
