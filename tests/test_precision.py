"""Precision as Lightning means it, on a bfloat16-stored copy of the bundled model: float32 master
weights, gradients and AdamW state under bf16-mixed, bfloat16 everything under bf16-true, frozen
models in the compute dtype, a contradicting `dtype` refused, exports in the stored dtype."""

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from plpost import ChatDataModule, DPOModule, PreferenceDataModule, SFTModule
from plpost.callbacks import HFExport
from plpost.export import export_checkpoint
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.precision import check_dtype_fits

from conftest import TINY, bundled_pairs
from plpost.modules import ModelSettings


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> str:
    """The bundled model's weights rounded to bfloat16 and stored so, as Qwen or Llama ship theirs."""
    folder = tmp_path_factory.mktemp("bf16-tiny")
    load_causal_lm(TINY).to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer(TINY).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return str(folder)


def chats() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(8)]


class Dtypes(L.Callback):
    """Before the first optimizer step: the dtypes of the trained weights and their gradients, and
    which weights have a non-zero gradient (the only ones a first AdamW step without weight decay moves)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.weights = {p.dtype for p in params}
            self.gradients = {p.grad.dtype for p in params if p.grad is not None}
            self.moved = {id(p): p.grad != 0 for p in params if p.grad is not None}


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


def sft_step(model: str, precision: str, tmp_path, **export):
    module = SFTModule(model, optimizer=adamw)
    data = ChatDataModule(model, train=chats(), batch_size=8, shuffle=False)
    dtypes = Dtypes()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[dtypes, HFExport(str(tmp_path / "model"), **export)])
    trainer.fit(module, data)
    return module, trainer, dtypes


def changed_share(module, dtypes, initial: dict[str, torch.Tensor]) -> float:
    """Of the weights with a non-zero gradient, the share that one step changed."""
    changed = moved = 0
    for name, p in module.policy.named_parameters():
        mask = dtypes.moved[id(p)]
        changed += int((p.detach() != initial[name].to(p.dtype))[mask].sum())
        moved += int(mask.sum())
    return changed / moved


def test_bf16_mixed_trains_float32_master_weights_of_a_bf16_checkpoint(bf16_checkpoint, tmp_path):
    """AdamW's first step moves each weight with a non-zero gradient by lr * g / (|g| + eps), about
    1e-6. A float32 weight of |w| < 8 has a spacing below 1e-6, so every one of them changes;
    a bfloat16 weight of 0.02 has a spacing of 2**-13 (1.2e-4) and keeps its value (see the bf16-true test)."""
    initial = load_causal_lm(bf16_checkpoint).state_dict()
    module, trainer, dtypes = sft_step(bf16_checkpoint, "bf16-mixed", tmp_path)
    assert dtypes.weights == {torch.float32} and dtypes.gradients == {torch.float32}
    state = trainer.optimizers[0].state.values()
    assert {s[key].dtype for s in state for key in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    assert changed_share(module, dtypes, initial) > 0.999


def test_bf16_true_trains_bfloat16_weights_and_loses_small_updates(bf16_checkpoint, tmp_path):
    """bf16-true is the user's choice of bfloat16 weights, gradients and optimizer state; the same
    1e-6 step then rounds away at almost every weight (measured: under 5% change)."""
    initial = load_causal_lm(bf16_checkpoint).state_dict()
    module, trainer, dtypes = sft_step(bf16_checkpoint, "bf16-true", tmp_path)
    assert dtypes.weights == {torch.bfloat16} and dtypes.gradients == {torch.bfloat16}
    state = trainer.optimizers[0].state.values()
    assert {s[key].dtype for s in state for key in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    assert changed_share(module, dtypes, initial) < 0.05


def test_exports_are_written_in_the_stored_dtype_unless_asked_otherwise(bf16_checkpoint, tmp_path):
    """HFExport writes the float32 master weights of a bfloat16 checkpoint in bfloat16 (rounded to
    nearest, what `.to(torch.bfloat16)` gives), with `dtype: bfloat16` in its config; `dtype="float32"`
    writes them unrounded. `plpost export` of the run's checkpoint writes what HFExport wrote, or float32 when asked."""
    module, trainer, _ = sft_step(bf16_checkpoint, "bf16-mixed", tmp_path / "stored")
    trained = {name: p.detach() for name, p in module.policy.named_parameters()}
    stored = load_file(tmp_path / "stored" / "model" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "stored" / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, weight in stored.items():
        torch.testing.assert_close(weight, trained[name].to(torch.bfloat16), rtol=0, atol=0)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    export_checkpoint(tmp_path / "run.ckpt", tmp_path / "exported")
    assert load_file(tmp_path / "exported" / "model.safetensors").keys() == stored.keys()
    for name, weight in load_file(tmp_path / "exported" / "model.safetensors").items():
        torch.testing.assert_close(weight, stored[name], rtol=0, atol=0)
    export_checkpoint(tmp_path / "run.ckpt", tmp_path / "exported-float32", dtype="float32")
    for name, weight in load_file(tmp_path / "exported-float32" / "model.safetensors").items():
        torch.testing.assert_close(weight, trained[name], rtol=0, atol=0)

    module, _, _ = sft_step(bf16_checkpoint, "bf16-mixed", tmp_path / "float32", dtype="float32")
    written = load_file(tmp_path / "float32" / "model" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.float32}
    assert json.loads((tmp_path / "float32" / "model" / "config.json").read_text())["dtype"] == "float32"


def test_a_copy_reference_is_kept_in_the_compute_dtype(bf16_checkpoint):
    """DPO under bf16-mixed: the policy trains float32 weights, the frozen reference (a copy of the
    policy's starting weights) is bfloat16, what autocast computes in: half the memory, and exact
    for a bfloat16 checkpoint, whose upcast weights round back to themselves."""
    module = DPOModule(bf16_checkpoint, optimizer=adamw)
    data = PreferenceDataModule(bf16_checkpoint, train=bundled_pairs(4), batch_size=4, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in module.reference.parameters()} == {torch.bfloat16}
    initial = load_causal_lm(bf16_checkpoint).state_dict()
    for name, weight in module.reference.model.state_dict().items():
        torch.testing.assert_close(weight, initial[name], rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "precision"), [("bfloat16", "bf16-mixed"), ("float32", "bf16-true"),
                                                   ("bfloat16", "32-true"), ("float16", "bf16-mixed")])
def test_a_dtype_that_contradicts_the_precision_is_refused_before_any_model_loads(dtype, precision):
    module = SFTModule(TINY, model_settings=ModelSettings(dtype=dtype))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=f"dtype: {dtype} contradicts precision: {precision}"):
        trainer.fit(module, ChatDataModule(TINY, train=chats(), batch_size=8))
    assert module.policy is None


@pytest.mark.parametrize(("dtype", "precision"), [("float32", "bf16-mixed"), ("float32", "32-true"),
                                                   ("bfloat16", "bf16-true"), (None, "bf16-true")])
def test_a_dtype_that_the_precision_implies_is_accepted(dtype, precision):
    check_dtype_fits(dtype, precision)
