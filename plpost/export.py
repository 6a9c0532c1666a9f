"""`plpost export CKPT OUT`: a Lightning checkpoint of any stage to a Hugging Face folder (and the Hub).

The checkpoint's own hyperparameters say which base model, tokenizer and LoRA settings the
policy was built with; the policy is built the same way, its trained weights are read from the
checkpoint, and the folder is written by the code `HFExport` writes with, so the two folders are
the same, model card included (its data and metrics are those `HFExport` kept in the checkpoint).
A `last.ckpt` of a killed run works: plpost writes checkpoints atomically. `--push-to-hub REPO`
uploads the folder (see `plpost.hub`).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from plpost.callbacks.export import write_hf_folder, write_model_card
from plpost.hf import DTYPES
from plpost.hub import HubPushError, check_push_possible, push_folder
from plpost.modules.base import STAGE_KEY, PostTrainingModule
from plpost.reward_head import SCORE_HEAD

POLICY_PREFIX = "policy."
STAGES = ("SFTModule", "RewardModule", "DPOModule", "PPOModule", "GRPOModule", "DistillationModule")


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned back into its policy; the message names the fix."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, read with `weights_only=True` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: give a Lightning checkpoint (e.g. outputs/run/checkpoints/last.ckpt)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(
            f"{path} holds no Lightning state_dict and hyper_parameters: give a checkpoint that a plpost stage saved"
        )
    return checkpoint


def stage_class(checkpoint: dict[str, Any], path: str | Path, stage: str | None = None) -> type[PostTrainingModule]:
    """The stage that saved the checkpoint: `stage` if given (a class name such as "SFTModule" or
    an import path), else the one the checkpoint names (plpost's own entry, or LightningCLI's)."""
    name = stage or checkpoint.get(STAGE_KEY) or checkpoint["hyper_parameters"].get("_class_path")
    if name is None:
        raise CheckpointError(f"{path} does not name its stage: pass --stage, one of {', '.join(STAGES)}")
    module_name, _, class_name = name.rpartition(".")
    if stage is None and module_name.split(".")[0] != "plpost":
        # A name read from a file is imported only from plpost; another package's stage is named by the user.
        raise CheckpointError(f"{path} names the stage {name}: pass --stage {name} to import it")
    cls = getattr(importlib.import_module(module_name or "plpost"), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PostTrainingModule)):
        raise CheckpointError(f"{name} is not a plpost stage module: pass --stage, one of {', '.join(STAGES)}")
    return cls


def module_from_checkpoint(path: str | Path, *, stage: str | None = None) -> PostTrainingModule:
    """The stage module of a checkpoint with its trained policy loaded (CPU, eval mode).

    Only the policy is built (the base model named in the hyperparameters, with LoRA and the
    stage's head as configured); frozen models, value heads and critics are not.
    """
    return module_of(read_checkpoint(path), path, stage=stage)


def module_of(checkpoint: dict[str, Any], path: str | Path, *, stage: str | None = None) -> PostTrainingModule:
    """`module_from_checkpoint` of a checkpoint already read."""
    module = stage_class(checkpoint, path, stage).from_hyperparameters(checkpoint["hyper_parameters"])
    weights = {
        key[len(POLICY_PREFIX) :]: value for key, value in checkpoint["state_dict"].items()
        if key.startswith(POLICY_PREFIX)
    }
    # Built in the dtype it was trained in (float32 under mixed precision), so nothing is rounded
    # before the export decides the written dtype.
    settings = module.model_settings
    module.model_settings = replace(settings, dtype=trained_dtype(weights) or settings.dtype)
    model = module.load_pretrained()
    is_classifier = getattr(model, SCORE_HEAD, None) is not None
    module.policy = module.prepare_trainable(model, task_type="SEQ_CLS" if is_classifier else "CAUSAL_LM")
    result = module.policy.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit the policy that its hyperparameters build (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}): pass the --stage that saved it"
        )
    module.policy.eval()
    return module


def trained_dtype(weights: dict[str, torch.Tensor]) -> str | None:
    """The dtype name of the checkpoint's floating-point weights (None if there are none)."""
    dtype = next((tensor.dtype for tensor in weights.values() if tensor.is_floating_point()), None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def training_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The data, metrics and step `HFExport` kept in the checkpoint (empty without an HFExport)."""
    states = checkpoint.get("callbacks", {})
    return next((state.get("record", {}) for key, state in states.items() if key.startswith("HFExport")), {})


def export_checkpoint(
    path: str | Path, out: str | Path, *, merge: bool | None = None, stage: str | None = None,
    dtype: str | None = None, push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
) -> Path:
    """Writes the checkpoint's policy to `out` as `HFExport` would have, model card included; returns `out`.
    dtype: a full model's weights' dtype (default: the starting checkpoint's, see `HFExport`).

    merge: for a LoRA policy, True writes merged full weights, False a PEFT adapter folder;
    None keeps the run's own `lora.merge_on_export`.
    push_to_hub: a Hub repo id to upload the folder to, `private` if it is created, on the branch
    `revision` (None: main); checked before anything is built (see `plpost.hub.check_push_possible`).
    """
    out = Path(out)
    if push_to_hub is not None:
        check_push_possible(push_to_hub, out)
    checkpoint = read_checkpoint(path)
    module = module_of(checkpoint, path, stage=stage)
    lora = module.model_settings.lora
    if merge is not None and lora is not None:
        module.model_settings = replace(module.model_settings, lora=replace(lora, merge_on_export=merge))
    write_hf_folder(module, out, dtype=dtype)
    write_model_card(module, out, training_record(checkpoint))
    if push_to_hub is not None:
        push_folder(out, push_to_hub, private=private, revision=revision)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plpost export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Lightning checkpoint of any plpost stage (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("out", help="the folder to write")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge", dest="merge", action="store_const", const=True, default=None,
                      help="LoRA: write merged full weights (default: the run's lora.merge_on_export)")
    lora.add_argument("--adapter", dest="merge", action="store_const", const=False,
                      help="LoRA: write a PEFT adapter folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="a full model's weights' dtype (default: the dtype the starting checkpoint is stored in)")
    parser.add_argument("--stage", help=f"the stage, for a checkpoint that does not name it ({', '.join(STAGES)})")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument("--revision", help="with --push-to-hub: the branch to push to (default: main)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, stage=args.stage, dtype=args.dtype,
                                push_to_hub=args.push_to_hub, private=args.private, revision=args.revision)
    except (CheckpointError, HubPushError) as error:
        parser.exit(2, f"plpost export: error: {error}\n")
    if not args.quiet:
        print(f"exported {args.checkpoint} to {out}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))
