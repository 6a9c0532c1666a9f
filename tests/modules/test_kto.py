"""KTOModule: the step-0 loss, the reference point, reference strategies, normalisation, learning."""


import lightning as L
import pytest
import torch
from conftest import TINY, bundled_pairs, first_step_gradients

from plpost.data.feedback import FeedbackDataModule
from plpost.hf import load_causal_lm
from plpost.losses import kto_loss
from plpost.modules import ModelSettings, LoraSettings
from plpost.modules.kto import KTOModule
from plpost.modules.preference_logps import completion_logps

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def varied_rows() -> list[dict]:
    """Pairs and unpaired rows of different lengths, labels of both kinds."""
    rows = bundled_pairs(3)
    rows[1]["prompt"][0]["content"] = "1+2 and then 30+40 please"
    return rows + [{"prompt": "5+6", "completion": "11 it is", "label": True},
                   {"prompt": "7+7", "completion": "41", "label": False}]


def batch_of(rows):
    data = FeedbackDataModule(TINY, train=rows, shuffle=False)
    data.setup("fit")
    return data.collate_fn()([(example, None) for example in data.train_examples])


def sgd_lr0(params):
    return torch.optim.SGD(params, lr=0.0)


def test_loss_is_half_the_weight_when_the_policy_is_its_reference():
    """At step 0 the copy reference is the policy: every log-ratio is 0, so z0 = max(0, 0) = 0 and
    each loss is weight * (1 - sigmoid(0)) = weight / 2; the rewards are 0."""
    module = KTOModule(TINY, desirable_weight=1.0, undesirable_weight=3.0)
    module.configure_model()
    batch = batch_of(varied_rows())
    out, metrics = module.example_losses(batch, "train")
    expected = torch.where(batch.desirable, 0.5, 1.5)
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(out.rewards, torch.zeros(len(expected)))
    assert float(metrics["kl"][0]) == 0.0


@pytest.mark.parametrize("policy_is_random", [True, False])
def test_reference_point_is_the_clamped_mean_mismatched_log_ratio(other_reference, policy_is_random):
    """z0 = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x)) for the mismatched rows,
    written out from each model's log-probs of those rows; the losses use it. The random model
    is the policy (a positive mean, kept) or the reference (a negative mean, clamped to 0)."""
    policy_name, reference_name = (other_reference, TINY) if policy_is_random else (TINY, other_reference)
    module = KTOModule(policy_name, TINY, reference_model=reference_name, beta=0.3)
    module.configure_model()
    batch = batch_of(varied_rows())
    with torch.no_grad():
        policy = completion_logps(module.policy, batch.mismatched)
        reference = completion_logps(load_causal_lm(reference_name).eval(), batch.mismatched)
        mean = (policy - reference).mean()
        out, metrics = module.example_losses(batch, "train")
        own = completion_logps(module.policy, batch.completions)
        own_reference = completion_logps(module.reference, batch.completions)
    assert (float(mean) > 0) == policy_is_random
    torch.testing.assert_close(metrics["kl"][0], mean.clamp(min=0), rtol=1e-5, atol=1e-5)
    expected = kto_loss(own, own_reference, batch.desirable, mean.clamp(min=0), beta=0.3)
    torch.testing.assert_close(out.losses, expected.losses, rtol=1e-5, atol=1e-5)


def test_gradients_are_the_same_for_7x1_and_2x4():
    """7 examples (2 pairs converted to 4 rows, and 3 more rows) as one micro-batch, or as 2, 2, 2, 1
    accumulated: each loss is divided by the examples of the step. At step 0 z0 is 0 in every
    micro-batch (policy == reference), so the layouts compute the same losses."""
    gradients = []
    for batch_size, accumulate in ((7, 1), (2, 4)):
        module = KTOModule(TINY, undesirable_weight=1.5, optimizer=sgd_lr0)
        data = FeedbackDataModule(TINY, train=varied_rows()[1:], batch_size=batch_size, shuffle=False)
        gradients.append(first_step_gradients(module, data, accumulate))
    whole, split = gradients
    assert whole.keys() == split.keys() and whole
    assert not any(name.startswith("reference.") for name in whole)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_precomputed_and_adapter_references_equal_the_live_ones(tmp_path, other_reference):
    """Precomputed log-probs (completion and mismatched completion of every example) equal a live
    frozen copy of the same reference on a batch that is not a precompute batch; the LoRA policy's
    adapter-disabled reference is its base model."""
    rows = varied_rows() + bundled_pairs(8)[3:]
    module = KTOModule(TINY, reference="precomputed", reference_model=other_reference,
                       reference_cache_dir=str(tmp_path), optimizer=sgd_lr0)
    data = FeedbackDataModule(TINY, train=rows, val_size=4, batch_size=4, eval_batch_size=3)
    L.Trainer(max_steps=1, limit_val_batches=1, **QUIET).fit(module, data)
    assert len(list(tmp_path.iterdir())) == 2
    live = KTOModule(TINY, reference_model=other_reference)
    live.configure_model()
    batch = data.collate_fn()([(e, None) for e in data.train_examples[::2]])
    torch.testing.assert_close(module.reference_logps(batch, "train"), live.reference_logps(batch, "train"),
                               rtol=1e-5, atol=1e-4)

    adapter = KTOModule(TINY, reference="adapter", model_settings=ModelSettings(lora=LoraSettings(r=4, alpha=8)))
    adapter.configure_model()
    for name, parameter in adapter.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    with torch.no_grad():
        base = load_causal_lm(TINY).eval()
        expected = (completion_logps(base, batch.completions), completion_logps(base, batch.mismatched))
    torch.testing.assert_close(tuple(adapter.reference_logps(batch, "train")), expected, rtol=1e-5, atol=1e-4)
    assert adapter.reference is None


class Margins(L.Callback):
    def __init__(self) -> None:
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/rewards/margins"]))


def test_training_widens_the_desirable_undesirable_reward_gap_on_the_bundled_pairs():
    """Full-batch KTO on 16 bundled pairs converted to 32 rows: the gap between the mean reward of
    the desirable and of the undesirable rows starts at 0 (policy == reference) and the mean of
    steps 11-15 exceeds 0.5 (measured: 1.7-2.4)."""
    L.seed_everything(0)
    margins = Margins()
    module = KTOModule(TINY, beta=0.1, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    data = FeedbackDataModule(TINY, train=bundled_pairs(16), batch_size=32, max_length=32)
    L.Trainer(max_steps=15, callbacks=[margins], **QUIET).fit(module, data)
    assert margins.values[0] == 0.0
    assert sum(margins.values[-5:]) / 5 > 0.5, margins.values


def test_validation_logs_means_over_every_example(other_reference):
    """val/rewards/chosen is the mean over all desirable validation examples (batches of 3 and 2),
    val/rewards/margins the difference of the two means."""
    module = KTOModule(TINY, reference_model=other_reference)
    data = FeedbackDataModule(TINY, val=varied_rows()[1:], eval_batch_size=3)
    result = L.Trainer(**QUIET).validate(module, data, verbose=False)[0]
    rewards, desirable = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            out, _ = module.example_losses(batch, "val")
            rewards.append(out.rewards)
            desirable.append(batch.desirable)
    rewards, desirable = torch.cat(rewards), torch.cat(desirable)
    chosen, rejected = rewards[desirable].mean(), rewards[~desirable].mean()
    torch.testing.assert_close(torch.tensor(result["val/rewards/chosen"]), chosen)
    torch.testing.assert_close(torch.tensor(result["val/rewards/margins"]), chosen - rejected)
    assert {"val/loss", "val/kl", "val/logps/chosen", "val/logps/rejected"} <= set(result)


def test_contradictory_settings_fail_before_loading():
    with pytest.raises(ValueError, match="needs `lora`"):
        KTOModule(TINY, reference="adapter")
    with pytest.raises(ValueError, match="desirable_weight"):
        KTOModule(TINY, desirable_weight=-1.0)
