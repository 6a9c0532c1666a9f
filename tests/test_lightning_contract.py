"""The stage modules keep LightningModule's own methods working: none is hidden by a stage attribute of
another kind (a static method where Lightning has a method, a value where it has a property)."""

import inspect

import lightning as L
import pytest

import plpost
from plpost.modules.base import PostTrainingModule

STAGES = [plpost.SFTModule, plpost.RewardModule, plpost.DPOModule, plpost.KTOModule, plpost.PPOModule,
          plpost.GRPOModule, plpost.DistillationModule]


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.__name__)
def test_no_stage_attribute_hides_a_lightning_one_with_another_kind(stage):
    hidden = []
    for cls in stage.__mro__[: stage.__mro__.index(L.LightningModule)]:
        for name, value in vars(cls).items():
            if name.startswith("__") or not hasattr(L.LightningModule, name):
                continue
            lightning = inspect.getattr_static(L.LightningModule, name)
            if type(value) is not type(lightning):
                hidden.append(f"{cls.__name__}.{name}: {type(value).__name__}, Lightning's is {type(lightning).__name__}")
    assert not hidden, hidden


def test_freeze_and_unfreeze_are_lightnings():
    """`LightningModule.freeze()` puts the whole module in eval mode with no parameter requiring grad;
    `unfreeze()` undoes both."""
    module = plpost.SFTModule("plpost:tiny")
    module.configure_model()
    module.freeze()
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    module.unfreeze()
    assert module.training and all(p.requires_grad for p in module.parameters())
    assert PostTrainingModule.freeze is L.LightningModule.freeze


def test_gradients_are_freed_at_each_optimizer_step_and_kept_while_accumulating():
    """Lightning zeroes gradients in the next step's closure, after that step's forward; the stages
    free them as the optimizer steps instead, so no forward runs beside a whole model's gradients.
    While accumulating they stay: with accumulate_grad_batches=2 the first batch of each pair ends
    with every trained parameter holding a gradient, the second with none."""
    held = []

    class Gradients(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            trained = [p for p in pl_module.parameters() if p.requires_grad]
            held.append((all(p.grad is not None for p in trained), any(p.grad is not None for p in trained)))

    chats = [{"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}]}
             for i in range(8)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Gradients()])
    trainer.fit(plpost.SFTModule("plpost:tiny"), plpost.ChatDataModule("plpost:tiny", train=chats, batch_size=2))
    assert held == [(True, True), (False, False), (True, True), (False, False)]
