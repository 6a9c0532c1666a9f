"""PPOModule: KL controller, extreme log-ratios, checkpoints and resuming, the critic variant, and
a small run in which the reward rises."""

import math
from functools import partial

import lightning as L
import pytest
import torch
from transformers import LlamaForSequenceClassification

from plpost.checkpointing import RNG_STATES_KEY
from plpost.data.prompts import PromptDataModule
from plpost.modules.ppo import PPOModule
from plpost.rewards import RewardFunction, RewardModel
from plpost.tasks.addition import exact_match_reward
from conftest import TINY

# The slow run: three SFT epochs over the 20k bundled demonstrations take the tiny base model to
# about 55% greedy accuracy on the held-out problems (one epoch leaves it near 5%, too rarely
# right for an exact-match reward to teach anything); 40 rollouts of 64 prompts then add ~30 points.
SFT_EXAMPLES, SFT_EPOCHS, PPO_ROLLOUTS = 20_000, 3, 40

QUESTIONS = ["1+1", "12+34", "5+5", "99+9", "20+22", "7+70", "33+3", "41+14"]
ROWS = [{"prompt": [{"role": "user", "content": q}], "answer": str(sum(map(int, q.split("+"))))} for q in QUESTIONS]


def digits_reward(prompts, completions, **columns) -> torch.Tensor:
    """Varies from the first rollout on (the base model rarely answers exactly), so updates move the policy."""
    return torch.tensor([float(sum(ch.isdigit() for ch in c)) for c in completions])


def ppo(**overrides) -> PPOModule:
    settings = dict(rewards=[RewardFunction(digits_reward)], max_new_tokens=4, ppo_epochs=1,
                    optimizer=partial(torch.optim.AdamW, lr=1e-3))
    return PPOModule(TINY, **{**settings, **overrides})


def trainer(**overrides) -> L.Trainer:
    settings = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**settings, **overrides})


def fit(module, *, batch_size=4, ckpt=None, **trainer_args) -> L.Trainer:
    L.seed_everything(0)
    run = trainer(**trainer_args)
    run.fit(module, PromptDataModule(TINY, ROWS, batch_size=batch_size), ckpt_path=ckpt)
    return run


def test_adaptive_kl_coefficient_moves_the_right_way():
    """target_kl 1e-6, horizon 40, 8 episodes per rollout (the whole data set in one batch).
    Rollout 1: the policy is its reference, KL = 0 < target, so err = clip(0/1e-6 - 1) = -0.2 and
    coef = 0.1 * (1 - 0.2 * 8 / 40) = 0.096. Rollout 2 (a second fit, one rollout again)
    follows an update, so its k3 KL > 1e-6, err = +0.2 and coef = 0.096 * (1 + 0.04) = 0.09984."""
    module = ppo(kl_coef=0.1, kl_estimator="k3", target_kl=1e-6, kl_horizon=40)
    fit(module, batch_size=8, max_steps=1)
    assert math.isclose(float(module.kl_coef), 0.096, rel_tol=1e-12)
    fit(module, batch_size=8, max_steps=1)
    assert math.isclose(float(module.kl_coef), 0.09984, rel_tol=1e-12)
    assert float(module.episodes) == 16 and float(module.rollouts) == 2


def test_losses_stay_finite_for_extreme_log_ratios():
    """A policy 1e4 nats above or below the sampling policy on every token: the ratio is clamped
    before exp(), so the loss and every gradient stay finite (and the clip fraction is 1)."""
    module = ppo()
    module.configure_model()
    data = PromptDataModule(TINY, ROWS, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rollout, *_ = module.make_rollout(batch)
    signs = torch.where(torch.arange(rollout.logprobs.numel()).view_as(rollout.logprobs) % 2 == 0, 1.0, -1.0)
    rollout = rollout._replace(logprobs=rollout.logprobs + 1e4 * signs, ref_logprobs=rollout.logprobs - 1e4)
    advantages = torch.where(rollout.response_mask, torch.randn_like(rollout.values), 0.0)
    loss, stats = module.micro_batch_loss(rollout, advantages, advantages, torch.arange(8))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())
    assert stats["policy/clipfrac"] > 0


def weights(module: PPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_restores_kl_coefficient_and_continues_like_an_uninterrupted_run(tmp_path):
    """Two rollouts per epoch. Run A trains 2 epochs straight; run B trains 1, is saved with
    trainer.save_checkpoint and resumed to 2 epochs. B restores its KL coefficient (adapted, so
    not the initial one), counters, optimizer and RNG, and ends with A's weights bit for bit."""
    settings = dict(kl_coef=0.1, target_kl=1.0, kl_horizon=40, temperature=0.9, ppo_epochs=2)
    straight = ppo(**settings)
    fit(straight, max_epochs=2)

    first = ppo(**settings)
    run = fit(first, max_epochs=1)
    path = tmp_path / "ppo.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # RNG states included: nothing but tensors and numbers
    assert not any(key.startswith("reference.") for key in checkpoint["state_dict"])
    assert "kl_coef" in checkpoint["state_dict"] and RNG_STATES_KEY in checkpoint
    assert "reference" in checkpoint["plpost_frozen_sources"]
    assert float(first.kl_coef) != 0.1

    restored = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, module):
            restored.update(kl_coef=float(module.kl_coef), episodes=float(module.episodes), weights=weights(module))

    resumed = ppo(**settings)
    fit(resumed, max_epochs=2, callbacks=[Capture()], ckpt=str(path))
    assert restored["kl_coef"] == float(first.kl_coef) and restored["episodes"] == 8
    saved = weights(first)
    assert all(torch.equal(restored["weights"][k], saved[k]) for k in saved)
    assert float(resumed.kl_coef) == float(straight.kl_coef)
    final, expected = weights(resumed), weights(straight)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_critic_from_the_reward_model_trains_and_only_it_is_checkpointed(tmp_path, reward_model_dir):
    module = ppo(rewards=[RewardModel(reward_model_dir), RewardFunction(exact_match_reward, weight=2.0)],
                 value_model="critic", num_mini_batches=2)
    run = fit(module, max_steps=2)
    assert run.global_step == 2  # 1 rollout x 1 epoch x 2 mini-batches
    head_before = LlamaForSequenceClassification.from_pretrained(reward_model_dir).score.weight
    assert not torch.equal(module.critic.score.weight, head_before)  # initialised from it, then trained
    run.save_checkpoint(tmp_path / "ppo.ckpt")
    keys = torch.load(tmp_path / "ppo.ckpt", weights_only=True)["state_dict"].keys()
    assert any(k.startswith("critic.") for k in keys)
    assert not any(k.startswith(("reference.", "reward_scorer.sources.")) for k in keys)
    assert module.value_head is None


@pytest.mark.slow
def test_exact_match_reward_rises_while_kl_stays_bounded(tmp_path):
    """SFT teaches the tiny base model the chat format and some addition; PPO with the exact-match
    reward (and the missing-EOS penalty) then lifts its greedy accuracy on held-out problems,
    while the KL to the SFT policy stays a few nats per response."""
    from plpost import ChatDataModule, SFTModule
    from plpost.callbacks import write_hf_folder
    from plpost.data.sources import DataSource, load_source
    from plpost.generation import generate_texts
    from plpost.optim import WarmupCosineLR

    L.seed_everything(0)
    sft = SFTModule(TINY, optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0),
                    scheduler=partial(WarmupCosineLR, warmup_steps=10, min_lr_ratio=0.1))
    chats = ChatDataModule(TINY, DataSource("plpost:data/addition/sft.jsonl", limit=SFT_EXAMPLES), batch_size=64,
                           max_length=32)
    trainer(max_epochs=SFT_EPOCHS).fit(sft, chats)
    write_hf_folder(sft, tmp_path / "sft")

    held_out = [dict(row) for row in load_source("plpost:data/addition/eval.jsonl")]

    def accuracy(module) -> float:
        completions = generate_texts(module.policy, module.tokenizer, [r["prompt"] for r in held_out], max_new_tokens=6)
        return float(exact_match_reward(None, completions.texts, [r["answer"] for r in held_out]).mean())

    policy = PPOModule(str(tmp_path / "sft"), rewards=[RewardFunction(exact_match_reward)], missing_eos_penalty=1.0,
                       max_new_tokens=6, ppo_epochs=2, optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0))
    policy.configure_model()
    before = accuracy(policy)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    prompts = PromptDataModule(str(tmp_path / "sft"), "plpost:data/addition/prompts.jsonl", batch_size=64)
    L.seed_everything(0)
    trainer(max_epochs=1, limit_train_batches=PPO_ROLLOUTS, callbacks=[Record()]).fit(policy, prompts)
    after = accuracy(policy)
    kl = [h["objective/kl"] for h in history]
    print(f"held-out greedy accuracy {before:.3f} -> {after:.3f}; KL per response max {max(kl):.2f}")
    assert after > before + 0.1
    assert all(math.isfinite(value) and value < 5.0 for value in kl)
