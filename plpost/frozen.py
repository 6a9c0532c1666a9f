"""Frozen models: what a stage compares its policy against or learns from, and never trains (the
reference of DPO, KTO, PPO and GRPO, the distillation teacher, a reward model).

One component for all of them:
- `FrozenCopy` holds one: no gradients, eval mode whatever `.train()` its owner gets, its source
  recorded in checkpoints in place of its weights. `PostTrainingModule` finds every `FrozenCopy`
  among its submodules and keeps each out of checkpoints; those held by the stage itself (a
  reference, a teacher) are also sharded and compiled with the policy (see
  `PostTrainingModule.frozen_model`).
- One rule for its weights (`is_policy_start`): a frozen model named by nothing is the policy's
  starting weights, copied before LoRA and sharding change it (with `random_init` too: the
  reference is the policy's own random start). A named one is the weights stored under that name;
  when that is the policy's own `model` loaded as stored, they are the starting weights again,
  copied rather than read twice.
- One set of reference options (`ReferenceKind`, checked by `resolve_reference`): "copy", "adapter"
  (the LoRA policy with its adapter off: no second model), "precomputed" (offline stages:
  log-probs computed once before training, see `plpost.modules.precomputed`), "none" (reference-free
  losses, or no KL), and "auto" ("adapter" with LoRA, else "copy").
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from plpost.assets import resolve_pretrained

ReferenceKind = Literal["auto", "copy", "adapter", "precomputed", "none"]
ResolvedReference = Literal["copy", "adapter", "precomputed", "none"]


class FrozenCopy(nn.Module):
    """A model that is never trained: no gradients, and eval mode (dropout off) whatever `.train()`
    its owner receives, so its outputs are a deterministic function of the input.

    model: the frozen model; source: the name or folder it comes from (recorded in checkpoints
    instead of it, see `model_fingerprint`); copied_start: it is a copy of the policy's starting
    weights rather than loaded from `source`. Calling it runs `model` under `torch.no_grad()`.
    """

    def __init__(self, model: nn.Module, source: str, *, copied_start: bool = False) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.source = source
        self.copied_start = copied_start

    def train(self, mode: bool = True) -> FrozenCopy:
        # Lightning switches the whole LightningModule to train mode; a frozen model must not follow.
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)


def is_policy_start(name: str | None, policy_model: str, random_init: bool) -> bool:
    """Whether a frozen model named `name` is the policy's starting weights (see the module docstring)."""
    return name is None or (name == policy_model and not random_init)


def starting_copy(model: nn.Module, dtype: str | None) -> nn.Module:
    """A copy of `model`'s weights (a reference that is the policy's starting point) in `dtype`
    (a name of `plpost.hf.DTYPES`; None: the model's own): the frozen model's compute dtype."""
    from plpost.hf import DTYPES

    duplicate = copy.deepcopy(model)
    return duplicate.to(DTYPES[dtype]) if dtype is not None else duplicate


def resolve_reference(
    kind: ReferenceKind, reference_model: str | None, *, policy_model: str, lora: bool, random_init: bool,
    stage: str, allowed: tuple[str, ...],
) -> ResolvedReference:
    """The reference a stage's settings ask for, "auto" resolved; refuses, in one sentence each and
    before any model loads, what contradicts itself or what `stage` cannot do (`allowed`)."""
    if kind not in allowed:
        raise ValueError(f"{stage} takes reference: {' | '.join(allowed)}, not {kind!r}")
    if kind == "auto":
        kind = "adapter" if lora else "copy"
    if kind == "adapter" and not lora:
        raise ValueError("reference='adapter' is the policy with its LoRA adapter disabled, so it needs `lora` "
                         "(in model_settings); without LoRA use reference='copy'")
    if kind == "adapter" and reference_model not in (None, policy_model):
        raise ValueError("reference='adapter' always compares against `model` (the adapter's base); for another "
                         "reference_model use reference='copy'")
    if kind == "precomputed" and random_init and reference_model is None:
        raise ValueError("random_init gives starting weights that cannot be reloaded for reference='precomputed'; "
                         "use reference='copy' or give reference_model")
    return kind


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model`, a peft `PeftModel`, as its own base model: adapters off, eval mode, no gradients.

    Yields the same object (no copy). Each submodule's train/eval mode is restored on exit, and
    the adapters are re-enabled (peft's `disable_adapter()` context does that part).
    Raises TypeError for a model without adapters.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"{type(model).__name__} has no adapter to disable: the policy needs LoRA (`lora:`)")
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def model_fingerprint(name_or_path: str) -> dict[str, Any]:
    """What identifies a model's weights without loading them.

    A local folder (or bundled `plpost:` name): its resolved path and the name, size and mtime of
    every file in it, so rewriting the weights changes the fingerprint. A Hub name: the commit
    its `config.json` resolves to in the local Hub cache (fetched if missing; the weights are not).
    """
    path = Path(resolve_pretrained(name_or_path))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return {
            "path": str(path.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    from transformers.utils import cached_file

    config = Path(cached_file(name_or_path, "config.json"))
    # The Hub cache stores files under .../snapshots/<commit>/: the commit names the weights.
    return {"hub": name_or_path, "revision": config.parent.name}


class HoldsFrozenModels:
    """What `PostTrainingModule` knows of frozen models, decided here once for every stage: how one
    is built, which are sharded and compiled, what checkpoints record of them, and the reference.

    Expects `model_name`, `model_settings`, `policy`, `load_pretrained` and `weights_dtype` of
    `PostTrainingModule`. A stage with a reference calls `choose_reference` in `__init__` (its
    base `plpost.modules.reference.ReferenceModule` does), `build_frozen_models` builds it with the
    policy, and the stage runs it through `reference_model()`.
    """

    # No class default for `reference` itself: nn.Module keeps submodules out of the instance's
    # __dict__, so a class attribute of that name would hide the registered copy.
    reference_kind: ResolvedReference = "none"
    reference_name: str | None = None

    def frozen_model(self, name: str | None, start: nn.Module) -> FrozenCopy:
        """The frozen model named `name` (None: the policy's start), in the compute dtype: `start`
        (the policy's starting weights, before LoRA) copied if `is_policy_start`, else loaded."""
        if is_policy_start(name, self.model_name, self.model_settings.random_init):
            return FrozenCopy(starting_copy(start, self.weights_dtype(frozen=True)), self.model_name, copied_start=True)
        return FrozenCopy(self.load_pretrained(name, random_init=False, frozen=True), name)

    def frozen_copies(self) -> dict[str, FrozenCopy]:
        """Every frozen model among the submodules, by its name in the state dict: kept out of checkpoints."""
        return {name: module for name, module in self.named_modules() if isinstance(module, FrozenCopy)}

    def stage_frozen_models(self) -> list[nn.Module]:
        """The frozen models the stage holds itself (a reference, a teacher), sharded and compiled
        with the policy. Reward models are held by the reward sources instead: each rank scores its
        own responses with a whole copy, so scoring never waits on another rank."""
        return [module.model for module in self.children() if isinstance(module, FrozenCopy)]

    def frozen_sources(self) -> dict[str, Any]:
        """Where each frozen model comes from, recorded in checkpoints in place of its weights."""
        sources: dict[str, Any] = {}
        for name, frozen in self.frozen_copies().items():
            sources[name] = model_fingerprint(frozen.source)
            if frozen.copied_start and self.model_settings.random_init:
                sources[name]["note"] = "random_init: the policy's starting weights, not reproducible from this name"
        if self.reference_kind == "adapter":
            sources["reference"] = f"{self.model_name} (the policy with its LoRA adapter disabled)"
        return sources

    # -- the reference --------------------------------------------------------------------
    def choose_reference(self, kind: ReferenceKind, reference_model: str | None, *, allowed: tuple[str, ...]) -> None:
        """Settles which reference the stage compares against (see `resolve_reference`)."""
        settings = self.model_settings
        self.reference_kind = resolve_reference(
            kind, reference_model, policy_model=self.model_name, lora=settings.lora is not None,
            random_init=settings.random_init, stage=type(self).__name__, allowed=allowed,
        )
        self.reference_name = reference_model  # None: the policy's starting weights
        self.reference = None

    def build_frozen_models(self, start: nn.Module) -> None:
        """The stage's frozen models, given the policy's starting weights `start`: the frozen copy
        of a "copy" reference here; a stage with another frozen model (a teacher) builds it instead."""
        if self.reference_kind == "copy":
            self.reference = self.frozen_model(self.reference_name, start)

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The reference to run a forward through: the frozen copy, or the policy with its adapter off."""
        if self.reference_kind == "copy":
            yield self.reference
        elif self.reference_kind == "adapter":
            with adapter_disabled(self.policy) as base:
                yield base
        else:
            raise RuntimeError(f"{type(self).__name__} has no live reference (reference: {self.reference_kind})")
