"""plpost's DPO and KTO values side by side with TRL 1.16's, on the same model, reference and rows.

TRL's losses live inside its trainers' `_compute_loss`; it is called here itself, on a stand-in
for the trainer that holds only what that method reads (its settings, an accelerator of one
device whose gathers are the identity, the metric store) and the real tiny models, which TRL
patches with its fused LM head as its trainers do. Each test pins one row of the README's
plpost-to-TRL table: where the conventions agree the values agree to 1e-5, and where they differ
(cDPO, RPO's per-pair NLL) the difference is shown.
"""

from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch
from conftest import TINY

from plpost.data.feedback import FeedbackDataModule
from plpost.data.preference import PreferenceDataModule
from plpost.hf import load_causal_lm
from plpost.modules.dpo import DPOModule
from plpost.modules.kto import KTOModule

trl_utils = pytest.importorskip("trl.trainer.utils")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

CLOSE = dict(rtol=1e-5, atol=1e-5)
TRL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def rows() -> list[dict]:
    """Pairs whose answers differ in length, so per-pair and per-token averages differ."""
    return [
        {"prompt": [{"role": "user", "content": f"{i}+{i * 7}"}],
         "chosen": [{"role": "assistant", "content": str(8 * i) + " is the sum" * (i % 3)}],
         "rejected": [{"role": "assistant", "content": str(8 * i + 10)}]}
        for i in range(1, 7)
    ]


def trl_models(plpost_module, reference: str):
    policy = load_causal_lm(TINY).eval()
    policy.load_state_dict(plpost_module.policy.state_dict())
    trl_utils.add_fused_lm_head(policy, outputs=TRL_OUTPUTS)
    ref = load_causal_lm(reference).eval()
    trl_utils.add_fused_lm_head(ref)
    return policy, ref


def trl_trainer(policy, ref, **settings) -> SimpleNamespace:
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                  unwrap_model=lambda m: m)
    return SimpleNamespace(
        model=policy, ref_model=ref, accelerator=accelerator, aux_loss_enabled=False, precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, **settings,
    )


def dpo_side_by_side(reference: str, plpost_settings: dict, trl_settings: dict) -> tuple[dict, dict]:
    """(plpost's batch loss and mean metrics, TRL's) for one batch of the pairs."""
    module = DPOModule(TINY, reference_model=reference, share_prompt=False, **plpost_settings)
    module.configure_model()
    module.eval()
    data = PreferenceDataModule(TINY, train=rows(), shuffle=False)
    data.setup("fit")
    batch = data.collate_fn()([(example, None) for example in data.train_examples])
    with torch.no_grad():
        policy, ref = module.policy_and_reference_logps(batch, "train")
        losses, metrics = module.pair_losses(policy, ref, batch)
    ours = {"loss": losses.sum() / batch.pair_normalizer, **{name: values.mean() for name, values in metrics.items()}}
    trainer = trl_trainer(*trl_models(module, reference), ld_alpha=None, f_divergence_type="reverse_kl",
                          use_weighting=False, beta=module.hparams.beta, **trl_settings)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": (batch.labels != -100).long()}
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    theirs = {"loss": loss, **{name: torch.tensor(values[-1]) for name, values in trainer._metrics["eval"].items()}}
    return ours, theirs


def assert_same(ours: dict, theirs: dict, names) -> None:
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), **CLOSE, msg=name)


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_loss_and_logged_rewards_equal_trls(other_reference, loss_type, label_smoothing):
    """The same loss and the same rewards/*, logps/* metrics; for IPO too, whose loss divides each
    log-ratio by its completion length while the logged rewards (both sides) do not."""
    ours, theirs = dpo_side_by_side(
        other_reference, dict(beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing),
        dict(loss_types=[loss_type], loss_weights=[1.0], label_smoothing=label_smoothing),
    )
    assert_same(ours, theirs, ("loss", *REWARDS))


def test_cdpo_differs_from_trl_whose_sigmoid_ignores_label_smoothing(other_reference):
    """TRL 1.16's sigmoid loss with label_smoothing 0.2 is plpost's with 0 (plain DPO); plpost's
    cDPO is another number."""
    cdpo, trl = dpo_side_by_side(other_reference, dict(beta=0.1, label_smoothing=0.2),
                                 dict(loss_types=["sigmoid"], loss_weights=[1.0], label_smoothing=0.2))
    plain, _ = dpo_side_by_side(other_reference, dict(beta=0.1), dict(loss_types=["sigmoid"], loss_weights=[1.0],
                                                                  label_smoothing=0.0))
    torch.testing.assert_close(plain["loss"], trl["loss"], **CLOSE)
    assert abs(float(cdpo["loss"] - trl["loss"])) > 1e-3


def test_rpo_per_token_is_trls_sigmoid_plus_sft_and_per_pair_is_not(other_reference):
    """rpo_alpha with nll_normalization "token" is TRL's loss_type=["sigmoid", "sft"],
    loss_weights=[1, alpha] (one micro-batch, one device); the default "pair" weighs each pair's
    per-token NLL equally and differs here, where the chosen answers have different lengths."""
    trl_settings = dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5], label_smoothing=0.0)
    token, trl = dpo_side_by_side(other_reference, dict(beta=0.1, rpo_alpha=0.5, nll_normalization="token"), trl_settings)
    pair, _ = dpo_side_by_side(other_reference, dict(beta=0.1, rpo_alpha=0.5), trl_settings)
    assert_same(token, trl, ("loss", *REWARDS))
    assert abs(float(pair["loss"] - trl["loss"])) > 1e-3


def test_kto_loss_kl_and_rewards_equal_trls(other_reference):
    """plpost's KTO batch (each example with its fixed mismatched completion) through TRL's
    KTOTrainer: the same loss, kl (z0), and desirable / undesirable reward and log-prob means.
    The random model is the policy here, so the mismatched log-ratios' mean, z0, is positive."""
    module = KTOModule(other_reference, TINY, reference_model=TINY, beta=0.1, desirable_weight=1.0, undesirable_weight=1.4)
    module.configure_model()
    module.eval()
    data = FeedbackDataModule(TINY, train=rows()[:4] + [{"prompt": "3+5", "completion": "8", "label": True}],
                              shuffle=False)
    data.setup("fit")
    batch = data.collate_fn()([(example, None) for example in data.train_examples])
    with torch.no_grad():
        out, metrics = module.example_losses(batch, "train")
    trainer = trl_trainer(*trl_models(module, TINY), beta=0.1, desirable_weight=1.0, undesirable_weight=1.4,
                          loss_type="kto", calculate_KL=True)
    trainer._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, trainer)  # a helper _compute_loss calls
    rows_, mismatched = batch.completions, batch.mismatched
    inputs = {"input_ids": rows_.input_ids, "attention_mask": rows_.attention_mask,
              "completion_mask": (rows_.labels != -100).long(), "label": batch.desirable,
              "KL_input_ids": mismatched.input_ids, "KL_attention_mask": mismatched.attention_mask,
              "KL_completion_mask": (mismatched.labels != -100).long()}
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    logged = {name: torch.tensor(values[-1]) for name, values in trainer._metrics["eval"].items()}
    torch.testing.assert_close(out.losses.sum() / batch.example_normalizer, loss, **CLOSE)
    assert float(logged["kl"]) > 0
    torch.testing.assert_close(metrics["kl"][0], logged["kl"], **CLOSE)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(metrics[name].mean(), logged[name], **CLOSE, msg=name)
