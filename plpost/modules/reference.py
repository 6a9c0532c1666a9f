"""ReferenceModule: what the stages that compare their policy with a frozen reference share (DPO,
KTO, PPO, GRPO): the `reference` and `reference_model` arguments, settled at construction, before
any model loads (`plpost.frozen` holds the kinds of reference and the rule of their weights)."""

from __future__ import annotations

from typing import Any, ClassVar

from plpost.frozen import ReferenceKind
from plpost.modules.base import PostTrainingModule


class ReferenceModule(PostTrainingModule):
    """Base of the stages whose policy is compared with a frozen reference.

    A stage names the `reference` values it takes in `reference_kinds`; one whose other arguments
    decide the reference (GRPO without a KL term, DPO's reference-free losses) extends
    `choose_reference`, which runs once the hyperparameters are saved.

    Args:
        reference: where the reference comes from (see `plpost.frozen`). "copy": a frozen second
            model in memory. "adapter": the policy with its LoRA adapter disabled (needs `lora`;
            no second copy, one more forward). "precomputed" (DPO, KTO): its log-probs computed
            for every training and validation example once before training (the reference loaded
            only for that pass), cached on disk. "none": no reference, only for DPO's
            reference-free loss_types. "auto": "adapter" with LoRA, else "copy" (DPO: "none" for
            its reference-free loss_types).
        reference_model: the reference's Hub name or folder (default, or `model` itself: the
            policy's starting weights, copied). Not with "adapter", whose reference is always `model`.
    """

    reference_kinds: ClassVar[tuple[ReferenceKind, ...]] = ("auto", "copy", "adapter")
    """The `reference` values the stage takes."""

    def __init__(self, *, reference: ReferenceKind = "auto", reference_model: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choose_reference(reference, reference_model, allowed=self.reference_kinds)
