"""RewardModule: rewards at the last real token, the loss, accumulation invariance, learning, export."""

import time

import lightning as L
import pytest
import torch
from conftest import TINY, first_step_gradients
from transformers import AutoModelForSequenceClassification

from plpost.callbacks.export import write_hf_folder
from plpost.data.preference import PreferenceDataModule
from plpost.data.sources import DataSource
from plpost.modules import LoraSettings, ModelSettings
from plpost.modules.reward import PAIR_METRICS, RewardModule, sequence_rewards
from plpost.optim import WarmupCosineLR


def pairs(count: int) -> list[dict]:
    """Prompts, chosen and rejected answers of different lengths, so rows need padding."""
    return [
        {
            "prompt": [{"role": "user", "content": f"{i}+{i * 7}"}],
            "chosen": [{"role": "assistant", "content": "7" * (i + 1)}],
            "rejected": [{"role": "assistant", "content": "3" * (count - i)}],
        }
        for i in range(count)
    ]


def built(tokenizer: str = TINY, **settings) -> RewardModule:
    torch.manual_seed(0)
    module = RewardModule(TINY, tokenizer, **settings)
    module.configure_model()
    return module.eval()


def batch_of(rows, tokenizer: str = TINY, **settings):
    data = PreferenceDataModule(tokenizer, train=rows, shuffle=False, **settings)
    data.setup("fit")
    return data.collate_fn()([(example, None) for example in data.train_examples])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_reward_is_the_score_of_the_last_real_token_of_the_row_alone(pad_is_eos_tokenizer_dir, padding_side):
    """With pad == eos every row ends in the pad id, so only the attention mask tells where it ends."""
    module = built(pad_is_eos_tokenizer_dir)
    batch = batch_of(pairs(4), pad_is_eos_tokenizer_dir, padding_side=padding_side)
    assert (batch.attention_mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        chosen, rejected = module.rewards(batch)
        expected = []
        for row, mask in zip(batch.input_ids, batch.attention_mask):
            alone = row[mask.bool()][None]
            hidden = module.policy.model(input_ids=alone).last_hidden_state[0, -1]
            expected.append(module.policy.score(hidden)[0])
        hf_pooled = module.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(torch.cat([chosen, rejected]), torch.stack(expected))
    # Negative control: Hugging Face's pad-id heuristic reads the wrong token here.
    assert not torch.allclose(hf_pooled, torch.stack(expected), atol=1e-4)


def test_one_forward_over_both_completions_equals_separate_forwards():
    module = built()
    batch = batch_of(pairs(4))
    half = batch.input_ids.shape[0] // 2
    with torch.no_grad():
        chosen, rejected = module.rewards(batch)
        separate = [
            sequence_rewards(module.policy, batch.input_ids[rows], batch.attention_mask[rows])
            for rows in (slice(0, half), slice(half, None))
        ]
    torch.testing.assert_close(chosen, separate[0])
    torch.testing.assert_close(rejected, separate[1])


def test_loss_is_bradley_terry_with_margin_plus_the_centering_term():
    """Per pair: -log sigmoid(r_c - r_r - m) + 0.1 * (r_c + r_r)^2, written out by hand here."""
    module = built(center_rewards_coefficient=0.1)
    rows = [{**row, "margin": margin} for row, margin in zip(pairs(3), [0.0, 1.0, -2.0])]
    batch = batch_of(rows)
    with torch.no_grad():
        module.policy.score.weight.normal_(0, 1.0)  # rewards of order 1, so every term matters
        out = module.pair_outputs(batch)
    c, r = out.chosen_rewards.double(), out.rejected_rewards.double()
    m = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    expected = torch.log1p(torch.exp(-(c - r - m))) + 0.1 * (c + r) ** 2
    torch.testing.assert_close(out.losses.double(), expected, rtol=1e-5, atol=1e-6)
    assert out.fit.accurate.tolist() == (c > r).tolist()


def reward_module() -> RewardModule:
    return RewardModule(TINY, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))


def test_gradients_are_the_same_for_7x1_and_2x4():
    """7 pairs as micro-batches of 2, 2, 2 and 1: a per-micro-batch mean would weigh the last
    pair double; the loss divided by the pairs of the whole step does not."""
    rows = pairs(7)
    whole = first_step_gradients(reward_module(), PreferenceDataModule(TINY, train=rows, batch_size=7, shuffle=False), 1)
    split = first_step_gradients(reward_module(), PreferenceDataModule(TINY, train=rows, batch_size=2, shuffle=False), 4)
    assert whole.keys() == split.keys() and any(name.startswith("policy.score") for name in whole)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


class TrainLosses(L.Callback):
    def __init__(self) -> None:
        self.losses, self.accuracies = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.accuracies.append(float(trainer.callback_metrics["train/accuracy"]))


def test_full_batch_training_fits_bundled_pairs():
    """20 full-batch steps on 32 bundled pairs: the Bradley-Terry loss starts near ln 2 (a random
    head scores both answers of a pair alike) and falls, and the model ranks the pairs it trained
    on (measured: loss 0.70 -> 0.07, accuracy of the last 5 steps 0.96). The held-out ranking,
    which takes the sum itself, is the slow test below."""
    L.seed_everything(0)
    recorder = TrainLosses()
    module = RewardModule(TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    data = PreferenceDataModule(TINY, train=DataSource("plpost:data/addition/preference.jsonl", limit=32),
                                batch_size=32, max_length=32)
    trainer = L.Trainer(max_steps=20, callbacks=[recorder], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert sum(recorder.losses[-5:]) / 5 < 0.5 * recorder.losses[0]
    assert sum(recorder.accuracies[-5:]) / 5 > 0.9


@pytest.mark.slow
def test_training_on_the_bundled_pairs_ranks_held_out_pairs(tmp_path):
    """The pairs differ only in the tens digit (a forgotten or a spurious carry), so ranking them
    takes the sum. Measured: held-out accuracy 0.97 after 120 steps, about 0.2 s of one core a step;
    a learning rate of 1e-3 or batches of 32 pairs stayed near chance in as many steps."""
    started = time.perf_counter()
    L.seed_everything(0)
    module = RewardModule(
        TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-4, weight_decay=0.0),
        scheduler=lambda optimizer: WarmupCosineLR(optimizer, warmup_steps=10, min_lr_ratio=0.1),
    )
    data = PreferenceDataModule(TINY, train="plpost:data/addition/preference.jsonl", val_size=500, batch_size=128)
    trainer = L.Trainer(
        max_steps=120, val_check_interval=120, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert {f"{stage}/{name}" for stage in ("train", "val") for name in PAIR_METRICS} <= metrics.keys()
    assert metrics["val/accuracy"] > 0.75, float(metrics["val/accuracy"])
    assert metrics["val/margin"] > 0  # chosen outscores rejected on average too, not just in count
    print(f"held-out accuracy {float(metrics['val/accuracy']):.3f} after {time.perf_counter() - started:.0f}s")


def test_export_reloads_as_a_sequence_classifier_with_the_same_rewards(tmp_path):
    module = built()
    with torch.no_grad():
        module.policy.score.weight.normal_(0, 1.0)
    batch = batch_of(pairs(4))
    write_hf_folder(module, tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.pad_token_id == module.tokenizer.pad_token_id
    with torch.no_grad():
        ours = torch.cat(module.rewards(batch))
        torch.testing.assert_close(sequence_rewards(reloaded, batch.input_ids, batch.attention_mask), ours)
        # pad != eos and right padding: Hugging Face's own pooling agrees, so other libraries can use it.
        torch.testing.assert_close(
            reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0], ours
        )


def test_lora_trains_the_score_head_and_merged_export_keeps_it(tmp_path):
    module = built(model_settings=ModelSettings(lora=LoraSettings(r=4, alpha=8, merge_on_export=True)))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n and "lora_" not in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    with torch.no_grad():  # stand-in for training: move the adapters and the head's trained copy
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    batch = batch_of(pairs(3))
    write_hf_folder(module, tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_rewards(reloaded, batch.input_ids, batch.attention_mask), torch.cat(module.rewards(batch)),
            rtol=1e-3, atol=1e-3,  # merged weights W + BA round differently from W x + B(A x)
        )


def test_a_model_without_a_score_head_is_refused():
    from transformers import AutoModelForCausalLM

    from plpost.assets import resolve_pretrained

    causal = AutoModelForCausalLM.from_pretrained(resolve_pretrained(TINY))
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="has no `base_model` backbone with a `score` head"):
        sequence_rewards(causal, ids, torch.ones_like(ids))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_shared_prompt_rows_give_the_rewards_and_gradients_of_two_padded_rows(attn_implementation, padding_side):
    """Causal attention: a prompt's hidden states do not depend on what follows, so computing the
    prompt once for both completions changes the cost only. Same weights, same batch, both layouts."""
    batch = batch_of(pairs(5), padding_side=padding_side)
    outputs = {}
    for share_prompt in (True, False):
        module = built(share_prompt=share_prompt, model_settings=ModelSettings(attn_implementation=attn_implementation))
        chosen, rejected = module.rewards(batch)
        (chosen - 2 * rejected).sum().backward()
        outputs[share_prompt] = (chosen, rejected, {n: p.grad for n, p in module.policy.named_parameters()})
    shared, padded = outputs[True], outputs[False]
    torch.testing.assert_close(shared[:2], padded[:2], atol=1e-5, rtol=1e-5)
    for name, grad in padded[2].items():
        torch.testing.assert_close(shared[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompt_refuses_an_attention_without_custom_masks_before_training():
    with pytest.raises(ValueError, match="share_prompt"):
        built(model_settings=ModelSettings(attn_implementation="flex_attention"))
    built(model_settings=ModelSettings(attn_implementation="flex_attention"), share_prompt=False)
