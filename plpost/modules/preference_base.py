"""What the offline preference stages (DPO, KTO) share: a policy compared against a frozen reference.

The reference is a frozen copy in memory ("copy"), the policy with its LoRA adapter disabled
("adapter"), log-probs computed once before training and cached on disk ("precomputed"), or
absent ("none", for reference-free losses). A stage says what it computes of a batch with
`model_logps` (a NamedTuple of (N,) values) and which example each value belongs to with
`example_index`; the reference gives the same NamedTuple, live or looked up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from plpost.frozen import FrozenCopy, model_fingerprint
from plpost.modules.building import disable_dropout
from plpost.modules.precomputed import cache_key, lookup, precompute_logps
from plpost.modules.reference import ReferenceModule


class PreferenceModule(ReferenceModule):
    """A policy trained against a frozen reference on a fixed dataset (see the module docstring).

    Subclasses define `model_logps`, `example_index` and `logps_type`.

    Args:
        beta: the inverse temperature of the implicit reward beta * log(pi / pi_ref); larger
            keeps the policy closer to the reference.
        reference_cache_dir: where "precomputed" keeps its log-probs, one file per reference,
            tokenizer and data; a rerun with the same ones reads them instead of recomputing.
        disable_dropout: turn off every dropout in the policy, so its log-probs are as
            deterministic as the reference's (as TRL's DPO and KTO do by default).
    """

    reference_kinds = ("auto", "copy", "adapter", "precomputed")
    logps_type: ClassVar[type[NamedTuple]]
    """The NamedTuple `model_logps` returns; its fields are the precomputed table's columns."""

    def __init__(
        self, *, beta: float = 0.1, reference_cache_dir: str = ".plpost-cache/reference", disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # split -> (the examples it holds, example_index -> reference values, one column per field)
        self.precomputed: dict[str, tuple[list[dict], Tensor]] = {}
        self.reference_cache_files: dict[str, str] = {}

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
    def build_models(self) -> None:
        super().build_models()
        if self.hparams.disable_dropout:
            disable_dropout(self.policy)
        self.check_policy()

    def frozen_sources(self) -> dict[str, Any]:
        sources = super().frozen_sources()
        if self.reference_kind == "precomputed":
            sources["reference"] = model_fingerprint(self.precomputed_source)
            sources.update({f"reference_logps/{split}": path for split, path in self.reference_cache_files.items()})
        return sources

    # -- reference values -----------------------------------------------------------------
    def reference_logps(self, batch: Any, split: str, layout: Any = None) -> NamedTuple | None:
        """From the frozen copy, the policy with its adapter disabled, the precomputed table, or None."""
        kind = self.reference_kind
        if kind in ("copy", "adapter"):
            with torch.no_grad(), self.reference_model() as reference:
                return self.model_logps(reference, batch, layout)
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
        if self.reference_kind != "precomputed":
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
        reference = model_fingerprint(self.precomputed_source)
        jobs = {}
        for split, rows in examples.items():
            key = cache_key(reference, rows, tokenizer=self.tokenizer_name, dtype=self.weights_dtype(frozen=True),
                            attn_implementation=self.model_settings.attn_implementation,
                            precision=self.trainer.precision)
            jobs[split] = (Path(self.hparams.reference_cache_dir) / f"{key}.pt", rows)
            self.reference_cache_files[split] = str(jobs[split][0])
        tables = precompute_logps(
            jobs, self.load_frozen_reference, self.indexed_logps, collate=data.collate_fn(),
            columns=len(self.logps_type._fields), batch_size=data.eval_batch_size, trainer=self.trainer,
        )
        self.precomputed.update({split: (examples[split], table.to(self.device)) for split, table in tables.items()})

    @property
    def precomputed_source(self) -> str:
        """What a "precomputed" reference loads: `reference_model`, else the policy's `model` as stored."""
        return self.reference_name or self.model_name

    def load_frozen_reference(self) -> nn.Module:
        """The reference on this device, converted as the strategy converted the policy (e.g. bf16-true)."""
        # Loaded whole on every rank, not sharded: each computes its share of the batches with it.
        # Loaded, not copied, even from the policy's own name: a resumed run's policy has trained since.
        reference = self.load_pretrained(self.precomputed_source, random_init=False, frozen=True, empty=False)
        model = self.trainer.precision_plugin.convert_module(reference)
        return FrozenCopy(model, source=self.precomputed_source).to(self.device)

    def indexed_logps(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        with self.trainer.precision_plugin.val_step_context():  # the autocast the live reference runs in
            logps = self.model_logps(model, batch)
        return self.example_index(batch), torch.stack(tuple(logps), dim=-1)
