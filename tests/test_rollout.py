"""Rollouts: responses cut after their stop token, and log-probs that the PPO update reproduces
exactly (ratio 1 on the first epoch) with left padding and a temperature other than 1."""

import lightning as L
import pytest
import torch

import plpost.modules.ppo as ppo_module
from plpost.data.prompts import PromptDataModule
from plpost.generation import encode_prompts, generation_config
from plpost.hf import load_causal_lm
from plpost.modules import LoraSettings, ModelSettings
from plpost.modules.ppo import PPOModule
from plpost.rewards import RewardFunction
from plpost.rollout import position_ids_from, response_forward, sample_responses
from conftest import TINY


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM whose `generate` returns fixed continuations."""

    def __init__(self, continuations: list[list[int]]) -> None:
        super().__init__()
        self.continuations = torch.tensor(continuations)
        self.modes = []

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        self.modes.append(self.training)
        return torch.cat([input_ids, self.continuations], dim=1)


def test_response_is_cut_after_its_first_stop_token(tokenizer):
    """Stop ids are <|end|> (2, also EOS) here. Row 0 stops at its 2nd token: what follows (even
    a non-pad token, 9) becomes padding and is masked; row 1 never stops and keeps all 4."""
    end, pad = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.pad_token_id
    input_ids, attention_mask = encode_prompts(tokenizer, ["12", "345"])
    model = ScriptedModel([[60, end, 9, end], [61, 62, 63, 64]]).train()
    config = generation_config(tokenizer, max_new_tokens=4)
    samples = sample_responses(model, input_ids, attention_mask, config, pad_token_id=pad)
    assert model.modes == [False] and model.training  # generated in eval mode, then given back
    assert samples.response_ids.tolist() == [[60, end, pad, pad], [61, 62, 63, 64]]
    assert samples.response_mask.tolist() == [[True, True, False, False], [True] * 4]
    assert samples.stopped.tolist() == [True, False]
    assert samples.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert samples.position_ids.tolist() == [[0, 0, 1, 2, 3, 3, 3], [0, 1, 2, 3, 4, 5, 6]]


def test_left_padded_log_probs_equal_the_unpadded_ones(tokenizer):
    """Position ids count from each row's first real token, so padding changes nothing: the padded
    row's log-probs equal those of the same tokens alone (up to float rounding)."""
    torch.manual_seed(0)
    model = load_causal_lm(TINY).eval()
    input_ids, attention_mask = encode_prompts(tokenizer, [[{"role": "user", "content": "12+34"}], "1"])
    config = generation_config(tokenizer, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=5)
    samples = sample_responses(model, input_ids, attention_mask, config, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        batched = response_forward(model, *samples[:4], temperature=0.7).logprobs
        keep = samples.attention_mask[1].bool()
        alone = samples.input_ids[1:2, keep]
        single = response_forward(model, alone, torch.ones_like(alone), position_ids_from(torch.ones_like(alone)),
                                  samples.response_mask[1:2, : int(samples.response_mask[1].sum())], temperature=0.7)
    length = single.logprobs.shape[1]
    torch.testing.assert_close(batched[1, :length], single.logprobs[0], rtol=1e-5, atol=1e-5)


def completion_length(prompts, completions, **columns):
    """A reward that differs between responses, so advantages are non-zero and the update moves the policy."""
    return torch.tensor([float(len(completion)) for completion in completions])


def record_first_rollout(monkeypatch, **module_args):
    """Runs one rollout with 2 PPO epochs and records every policy-loss call and the logged metrics."""
    calls = []
    original = ppo_module.ppo_policy_loss

    def recording(logprobs, old_logprobs, advantages, mask, **kw):
        out = original(logprobs, old_logprobs, advantages, mask, **kw)
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), mask.clone(), out.ratio))
        return out

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", recording)
    # Prompts of different lengths, so rows are left-padded by different amounts.
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": "0"} for q in ["1+1", "12+34", "5", "99+99+1"] * 2]
    data = PromptDataModule(TINY, rows, batch_size=8)
    module = PPOModule(TINY, rewards=[RewardFunction(completion_length)], max_new_tokens=4, temperature=0.7,
                       ppo_epochs=2, num_mini_batches=2, gradient_accumulation_steps=2, **module_args)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    L.seed_everything(0)
    trainer.fit(module, data)
    return calls, trainer.callback_metrics


@pytest.fixture(scope="module")
def first_rollout():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return record_first_rollout(monkeypatch)


def test_ratio_is_exactly_one_until_the_first_optimizer_step(first_rollout):
    """Epoch 0 runs its micro-batches over exactly the rows, shapes and order of the rollout's
    forward, so until the policy is first updated (both micro-batches of the first mini-batch)
    pi / pi_old is 1 bit for bit on every response token. Every later call follows an update."""
    calls, _ = first_rollout
    assert len(calls) == 2 * 2 * 2  # epochs x mini-batches x micro-batches
    before_update, after_update = calls[:2], calls[2:]
    for logprobs, old_logprobs, mask, ratio in before_update:
        assert torch.equal(logprobs[mask], old_logprobs[mask])
        assert torch.equal(ratio[mask], torch.ones_like(ratio[mask]))
    # Negative control: once the policy has moved, the same comparison tells the ratios apart.
    assert any(not torch.equal(ratio[mask], torch.ones_like(ratio[mask])) for _, _, mask, ratio in after_update)


def test_kl_is_zero_when_the_reference_is_the_policy_without_its_adapter(monkeypatch):
    """Before any update a LoRA policy (B matrices start at 0) and the same modules with the
    adapter switched off compute the same numbers: every k1 term is exactly 0."""
    _, metrics = record_first_rollout(monkeypatch, model_settings=ModelSettings(lora=LoraSettings(r=4, alpha=8)))
    assert float(metrics["objective/kl"]) == 0.0
    assert float(metrics["objective/non_score_reward"]) == 0.0


def test_kl_is_zero_up_to_rounding_when_the_reference_is_a_frozen_copy(first_rollout):
    """A frozen copy holds the same weights, so KL is 0 mathematically. It is not bit for bit on
    CPU: the copy's weights do not require grad, and PyTorch's CPU linear layer then takes another
    kernel for the LM head's (non-contiguous) input, which rounds differently (~1e-6 nats)."""
    _, metrics = first_rollout
    assert abs(float(metrics["objective/kl"])) < 1e-5


def test_resampled_rows_replace_a_group_and_responses_are_padded_to_the_wider():
    """Rows 2-3 (a group) are sampled again with 3 response positions where the batch had 2: every
    row is padded to 3 (pad id 0, masked, positions held at the last real one) and rows 2-3 are
    the new ones."""
    from plpost.rollout import Samples, replace_rows

    def samples(prompt, response, mask):
        attention = torch.cat([torch.ones_like(prompt), mask.long()], dim=1)
        return Samples(torch.cat([prompt, response], 1), attention, position_ids_from(attention), mask.bool(),
                       mask.all(1))

    prompt = torch.tensor([[5], [6], [7], [8]])
    old = samples(prompt, torch.tensor([[1, 2], [3, 0], [4, 4], [9, 9]]), torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]))
    new = samples(prompt[2:], torch.tensor([[7, 7, 7], [8, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    merged = replace_rows(old, torch.tensor([2, 3]), new, pad_token_id=0)
    assert merged.input_ids.tolist() == [[5, 1, 2, 0], [6, 3, 0, 0], [7, 7, 7, 7], [8, 8, 0, 0]]
    assert merged.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert merged.position_ids.tolist() == [[0, 1, 2, 2], [0, 1, 1, 1], [0, 1, 2, 3], [0, 1, 1, 1]]
    assert merged.stopped.tolist() == [True, False, True, False]
