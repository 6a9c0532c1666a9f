"""What the offline preference stages (DPO, KTO) share: a policy compared against a frozen reference.

The reference is a frozen copy in memory ("copy"), the policy with its LoRA adapter disabled
("adapter"), log-probs computed once before training and cached on disk ("precomputed"), or
absent ("none", for reference-free losses). A stage says what it computes of a batch with
`model_logps` (a NamedTuple of (N,) values) and which example each value belongs to with
`example_index`; the reference gives the same NamedTuple, live or looked up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from plpost.modules.base import PostTrainingModule, disable_dropout
from plpost.modules.reference import (
    FrozenCopy,
    adapter_disabled,
    cache_key,
    lookup,
    model_fingerprint,
    precompute_logps,
    starting_copy,
)

ReferenceKind = Literal["copy", "adapter", "precomputed", "none"]


class PreferenceModule(PostTrainingModule):
    """A policy trained against a frozen reference on a fixed dataset (see the module docstring).

    Subclasses call `init_reference()` after `save_hyperparameters()` (which must hold
    `reference`, `reference_model`, `reference_cache_dir`, `disable_dropout`, `lora`,
    `random_init`), and define `model_logps`, `example_index` and `logps_type`.
    """

    frozen_modules = ("reference",)
    logps_type: ClassVar[type[NamedTuple]]
    """The NamedTuple `model_logps` returns; its fields are the precomputed table's columns."""

    def init_reference(self) -> None:
        self.check_reference_settings()
        self.reference_name = self.hparams.reference_model or self.hparams.model
        self.reference: FrozenCopy | None = None  # built in configure_model for reference="copy"
        # split -> (the examples it holds, example_index -> reference values, one column per field)
        self.precomputed: dict[str, tuple[list[dict], Tensor]] = {}
        self.reference_cache_files: dict[str, str] = {}

    def check_reference_settings(self) -> None:
        """Fails on contradictory settings now, not after the model has loaded."""
        h = self.hparams
        if h.reference == "adapter" and h.lora is None:
            raise ValueError("reference='adapter' is the policy with its LoRA adapter disabled, so it needs `lora`; "
                             "without LoRA use reference='copy' or 'precomputed'")
        if h.reference == "adapter" and h.reference_model not in (None, h.model):
            raise ValueError("reference='adapter' always compares against `model` (the adapter's base); "
                             "for another reference_model use reference='copy' or 'precomputed'")
        if h.reference == "precomputed" and h.random_init and h.reference_model is None:
            raise ValueError("random_init gives starting weights that cannot be reloaded for reference='precomputed'; "
                             "use reference='copy' or give reference_model")

    def model_logps(self, model: nn.Module, batch: Any, layout: Any = None) -> NamedTuple:
        """`model`'s values of each example of `batch` (a `logps_type`); layout: what the caller
        prepared of the batch for both the policy and the reference, if anything."""
        raise NotImplementedError

    def example_index(self, batch: Any) -> Tensor:
        """(N,) the key of each example of `batch` in the precomputed tables."""
        raise NotImplementedError

    def check_policy(self) -> None:
        """Checks the policy can run as the settings ask, once it is built (nothing by default)."""

    # -- models ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        start = self.load_pretrained()
        if self.hparams.reference == "copy":
            # The policy's own starting weights need no second load (and random_init needs the copy).
            frozen_dtype = self.weights_dtype(frozen=True)
            weights = starting_copy(start, frozen_dtype) if self.hparams.reference_model is None else self.load_reference()
            self.reference = FrozenCopy(weights, source=self.frozen_sources()["reference"])
        self.policy = self.prepare_trainable(start)
        if self.hparams.disable_dropout:
            disable_dropout(self.policy)
        self.check_policy()
        self.finish_models()

    def sharded_modules(self) -> list[torch.nn.Module | None]:
        return [self.policy, self.reference.model if self.reference is not None else None]

    def compiled_modules(self) -> list[nn.Module | None]:
        # The frozen copy runs over the same rows as the policy at every step, a forward as long as
        # the policy's own, and costs one more compile without a backward (measured on the tiny
        # model: no longer first step). "adapter" is the policy itself, compiled already (with the
        # adapter off it compiles once more); "precomputed" runs its reference once, before
        # training, where the compile would cost about what it saves.
        return [self.policy, self.reference.model if self.reference is not None else None]

    def load_reference(self, *, empty: bool | None = None) -> nn.Module:
        return self.load_pretrained(self.reference_name, random_init=False, frozen=True, empty=empty)

    def frozen_sources(self) -> dict[str, str]:
        kind = self.hparams.reference
        if kind == "adapter":
            return {"reference": f"{self.model_name} (the policy with its LoRA adapter disabled)"}
        if kind == "none":
            return {}
        source = self.reference_name
        if self.hparams.random_init and self.hparams.reference_model is None:
            source += " (random_init: the starting weights are not reproducible from this name)"
        sources = {"reference": source}
        sources.update({f"reference_logps/{split}": path for split, path in self.reference_cache_files.items()})
        return sources

    # -- reference values -----------------------------------------------------------------
    def reference_logps(self, batch: Any, split: str, layout: Any = None) -> NamedTuple | None:
        """From the frozen copy, the policy with its adapter disabled, the precomputed table, or None."""
        kind = self.hparams.reference
        if kind == "copy":
            with torch.no_grad():
                return self.model_logps(self.reference, batch, layout)
        if kind == "adapter":
            with adapter_disabled(self.policy) as base:
                return self.model_logps(base, batch, layout)
        if kind == "precomputed":
            _, table = self.precomputed[split]
            return self.logps_type(*lookup(table, self.example_index(batch)).unbind(-1))
        return None

    def on_fit_start(self) -> None:
        self.precompute_reference(("train", "val"))

    def on_validation_start(self) -> None:
        self.precompute_reference(("val",))  # for `validate` without `fit`

    def precompute_reference(self, splits: tuple[str, ...]) -> None:
        """Fills `self.precomputed` for the splits the data module has, from cache or one forward pass."""
        if self.hparams.reference != "precomputed":
            return
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "train_examples"):
            expected = " or ".join(kind.__name__ for kind in self.data_modules)
            raise ValueError(f"reference='precomputed' needs a plpost data module ({expected}): it "
                             "precomputes the reference log-probs of its train_examples and val_examples")
        examples = {split: getattr(data, f"{split}_examples") for split in splits}
        # Identity, not equality: a new data module (another `fit` or `validate`) is looked at again.
        examples = {s: rows for s, rows in examples.items() if rows and self.precomputed.get(s, (None,))[0] is not rows}
        if not examples:
            return
        reference = model_fingerprint(self.reference_name)
        jobs = {}
        for split, rows in examples.items():
            key = cache_key(reference, rows, tokenizer=self.tokenizer_name, dtype=self.weights_dtype(frozen=True),
                            attn_implementation=self.attn_implementation, precision=self.trainer.precision)
            jobs[split] = (Path(self.hparams.reference_cache_dir) / f"{key}.pt", rows)
            self.reference_cache_files[split] = str(jobs[split][0])
        tables = precompute_logps(
            jobs, self.load_frozen_reference, self.indexed_logps, collate=data.collate_fn(),
            columns=len(self.logps_type._fields), batch_size=data.eval_batch_size, trainer=self.trainer,
        )
        self.precomputed.update({split: (examples[split], table.to(self.device)) for split, table in tables.items()})

    def load_frozen_reference(self) -> nn.Module:
        """The reference on this device, converted as the strategy converted the policy (e.g. bf16-true)."""
        # Loaded whole on every rank, not sharded: each computes its share of the batches with it.
        model = self.trainer.precision_plugin.convert_module(self.load_reference(empty=False))
        return FrozenCopy(model, source=self.reference_name).to(self.device)

    def indexed_logps(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        with self.trainer.precision_plugin.val_step_context():  # the autocast the live reference runs in
            logps = self.model_logps(model, batch)
        return self.example_index(batch), torch.stack(tuple(logps), dim=-1)
