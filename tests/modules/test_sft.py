"""SFTModule: normalisation invariance, a falling loss, precision modes, LoRA."""

import lightning as L
import pytest
import torch
from conftest import TINY, chat, first_step_gradients

from plpost import ChatDataModule, SFTModule
from plpost.data.sources import DataSource
from plpost.modules import ModelSettings, LoraSettings


def variable_length_rows(count: int = 8) -> list[dict]:
    """Answers from 1 to 8 digits (plus a second turn on odd rows): token counts differ a lot."""
    rows = []
    for i in range(count):
        turns = [f"{i}+{i}", "7" * (i + 1)]
        if i % 2:
            turns += ["again", "12345"]
        rows.append({"messages": chat(*turns)})
    return rows


def sgd_lr0(params):
    return torch.optim.SGD(params, lr=0.0)


def sft_data(rows: list[dict], batch_size: int) -> ChatDataModule:
    return ChatDataModule(TINY, train=rows, batch_size=batch_size, shuffle=False)


def test_gradients_are_the_same_for_8x1_and_2x4_on_variable_length_data():
    """The step's loss is sum(token losses) / tokens of the whole step, whatever the layout."""
    rows = variable_length_rows()
    whole = first_step_gradients(SFTModule(TINY, optimizer=sgd_lr0), sft_data(rows, 8), accumulate=1)
    split = first_step_gradients(SFTModule(TINY, optimizer=sgd_lr0), sft_data(rows, 2), accumulate=4)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_per_micro_batch_mean_would_not_be_invariant():
    """Negative control: averaging per micro-batch weighs tokens differently, so the data above
    does distinguish a correct normaliser from a naive one."""
    rows = variable_length_rows()
    module = SFTModule(TINY)
    module.configure_model()
    data = ChatDataModule(TINY, train=rows, batch_size=2, shuffle=False)
    data.setup("fit")
    collate = data.collate_fn()
    batches = [collate([(e, None) for e in data.train_examples[i : i + 2]]) for i in range(0, 8, 2)]
    per_token = [module.token_losses(b) for b in batches]
    total = sum(o.losses.sum() for o in per_token) / sum(o.mask.sum() for o in per_token)
    naive = sum(o.losses.sum() / o.mask.sum() for o in per_token) / 4
    assert not torch.isclose(total, naive, rtol=1e-3)


def run_sft(tmp_path, *, steps: int, precision: str = "32-true", lora=None, lr: float = 3e-3, rows=None, **trainer):
    L.seed_everything(0)
    module = SFTModule(TINY, model_settings=ModelSettings(lora=lora), optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
    # As many bundled chats as the steps take: setting up all 20k would cost more than the steps.
    bundled = DataSource("plpost:data/addition/sft.jsonl", limit=32 * steps)
    data = ChatDataModule(TINY, train=rows or bundled, batch_size=32, max_length=32)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=steps, precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], default_root_dir=tmp_path, **trainer,
    )
    trainer.fit(module, data)
    return module, history


def test_loss_falls_on_the_bundled_chats(tmp_path):
    _, history = run_sft(tmp_path, steps=40)
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train(tmp_path, precision):
    module, history = run_sft(tmp_path, steps=3, precision=precision)
    assert all(torch.isfinite(torch.tensor(history)))
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert next(module.policy.parameters()).dtype == expected


def test_lora_trains_only_the_adapters(tmp_path):
    module, history = run_sft(tmp_path, steps=3, lora=LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.isfinite(torch.tensor(history)))


def test_packed_and_padded_batches_give_the_same_token_losses():
    """Packing only removes padding: with position ids restarting and attention kept inside each
    sequence, every supervised token has the same loss as in the padded batch."""
    module = SFTModule(TINY)
    module.configure_model()
    rows = variable_length_rows()
    padded = ChatDataModule(TINY, train=rows, shuffle=False)
    packed = ChatDataModule(TINY, train=rows, shuffle=False, packing=True)
    padded.setup("fit")
    packed.setup("fit")
    items = [(e, None) for e in padded.train_examples]
    padded_out = module.token_losses(padded.collate_fn()(items))
    packed_out = module.token_losses(packed.collate_fn()(items))
    torch.testing.assert_close(packed_out.losses[packed_out.mask], padded_out.losses[padded_out.mask])
    assert packed_out.mask.sum() == padded_out.mask.sum()
