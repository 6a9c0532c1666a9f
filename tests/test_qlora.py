"""QLoRA: base weights quantized to 4 bits by bitsandbytes (its CPU backend runs here), LoRA
adapters trained on top, and the refusals where quantized loading cannot work."""

import subprocess
import sys

import pytest
import torch
from conftest import TINY

from plpost.hf import (
    QuantizationError,
    QuantizationSettings,
    check_quantization_device,
    load_causal_lm,
    prepare_quantized_for_training,
)

bnb = pytest.importorskip("bitsandbytes")


def test_settings_translate_to_bitsandbytes_config():
    """The defaults are QLoRA's: NF4, double quantization, matmuls in the weights' dtype."""
    config = QuantizationSettings().bnb_config("bfloat16")
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert QuantizationSettings().bnb_config(None).bnb_4bit_compute_dtype == torch.float32
    fp4 = QuantizationSettings(quant_type="fp4", double_quant=False, compute_dtype="float16").bnb_config("bfloat16")
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert fp4.bnb_4bit_compute_dtype == torch.float16
    assert QuantizationSettings(bits=8).bnb_config(None).load_in_8bit
    with pytest.raises(QuantizationError, match="4 or 8"):
        QuantizationSettings(bits=3).bnb_config(None)


def linear_weights(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and ".layers." in name}


def test_four_bit_weights_take_half_a_byte_and_keep_the_logits():
    """Every decoder linear becomes a bnb Linear4bit whose packed weight holds n / 2 bytes (two 4-bit
    values a byte, float32 had 4 bytes a value); the quantized model's next-token distribution stays
    close to the full model's: measured KL(full || 4-bit) 0.014-0.018 nats per position (against
    3.4-3.6 to the uniform distribution), the same most likely token everywhere."""
    full = load_causal_lm(TINY).eval()
    quantized = load_causal_lm(TINY, quantization=QuantizationSettings()).eval()
    full_linears, quantized_linears = linear_weights(full), linear_weights(quantized)
    assert full_linears.keys() == quantized_linears.keys() and full_linears
    for name, layer in quantized_linears.items():
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == full_linears[name].weight.numel() // 2
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        expected, actual = full(ids).logits.log_softmax(-1), quantized(ids).logits.log_softmax(-1)
    kl = (expected.exp() * (expected - actual)).sum(-1)
    assert (kl < 0.05).all() and (kl > 0).all()
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_lora_on_four_bit_weights_trains_the_adapters_only():
    """Eight AdamW steps on one sequence: the loss falls, only LoRA parameters are trainable, and the
    model with its adapters switched off gives the logits of before training (the 4-bit base is
    untouched)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = prepare_quantized_for_training(load_causal_lm(TINY, quantization=QuantizationSettings()))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_quantized_loading_is_refused_where_it_cannot_work():
    with pytest.raises(QuantizationError, match="random_init"):
        load_causal_lm(TINY, random_init=True, quantization=QuantizationSettings())
    with pytest.raises(QuantizationError, match="sharded from rank 0"):
        load_causal_lm(TINY, empty=True, quantization=QuantizationSettings())
    with pytest.raises(QuantizationError, match="no mps backend"):
        check_quantization_device("mps")


def test_without_bitsandbytes_the_error_says_how_to_install_it():
    """A Python where bitsandbytes cannot be imported (None in sys.modules makes import fail)."""
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from plpost.hf import QuantizationSettings, load_causal_lm\n"
            "try:\n    load_causal_lm('plpost:tiny', quantization=QuantizationSettings())\n"
            "except ValueError as error:\n    print(type(error).__name__, error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("QuantizationError") and "pip install 'plpost[qlora]'" in out


def test_an_sft_stage_trains_lora_on_four_bit_weights_and_exports_the_adapter(tmp_path):
    """`model_settings: {lora: ..., quantization: {}}`: the policy's decoder linears load as 4-bit
    layers, two SFT steps move the adapters only, and HFExport writes a PEFT adapter folder that
    loads on the base model."""
    import lightning as L
    from peft import PeftModel

    from plpost import ChatDataModule, SFTModule
    from plpost.callbacks import HFExport
    from plpost.modules.settings import LoraSettings, ModelSettings

    settings = ModelSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), quantization=QuantizationSettings())
    module = SFTModule(TINY, model_settings=settings, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatDataModule(TINY, train="plpost:data/addition/sft.jsonl", batch_size=8, max_length=32)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[HFExport(str(tmp_path / "export"))])
    trainer.fit(module, data)
    assert any(isinstance(layer, bnb.nn.Linear4bit) for layer in module.policy.modules())
    assert all("lora_" in name for name, p in module.policy.named_parameters() if p.requires_grad)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert (tmp_path / "export" / "adapter_config.json").exists()
    PeftModel.from_pretrained(load_causal_lm(TINY), tmp_path / "export")


def test_quantization_without_lora_or_with_a_merged_export_is_refused():
    from plpost.modules.settings import LoraSettings, ModelSettings

    with pytest.raises(ValueError, match="give `lora:` too"):
        ModelSettings(quantization=QuantizationSettings())
    with pytest.raises(ValueError, match="merge_on_export"):
        ModelSettings(lora=LoraSettings(merge_on_export=True), quantization=QuantizationSettings())
