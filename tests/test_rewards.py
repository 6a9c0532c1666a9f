"""Reward sources: Python callables, reward-model folders, their weighted sum and its shaping."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from plpost.generation import encode_prompts
from plpost.losses import per_token_rewards
from plpost.rewards import Responses, RewardFunction, RewardModel, RewardScorer
from plpost.running_moments import RunningMoments
from plpost.rollout import position_ids_from
from plpost.tasks.addition import exact_match_reward


def responses_of(tokenizer, prompts, completions, *, stopped=None, **columns) -> Responses:
    """Responses as the rollout builds them: left-padded prompt ids, then completion + <|end|> (if stopped)."""
    stopped = [True] * len(prompts) if stopped is None else stopped
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([end] if s else []) for c, s in zip(completions, stopped)]
    width = max(len(r) for r in rows)
    response = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    mask = torch.cat([prompt_mask, response_mask], 1)
    return Responses(list(prompts), list(completions), columns, torch.cat([prompt_ids, response], 1), mask,
                     position_ids_from(mask), torch.tensor(stopped))


def ask(question):
    return [{"role": "user", "content": question}]


def test_reward_function_gets_prompts_completions_and_columns(tokenizer):
    responses = responses_of(tokenizer, [ask("1+2"), ask("3+4")], ["3", "8"], answer=["3", "7"])
    scores = RewardFunction(exact_match_reward)(responses)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))


def test_reward_function_of_the_wrong_shape_is_named(tokenizer):
    responses = responses_of(tokenizer, [ask("1+2")], ["3"])
    with pytest.raises(ValueError, match=r"reward function .*<lambda> returned shape \(2,\), expected \(1,\)"):
        RewardFunction(lambda prompts, completions: [1.0, 2.0])(responses)


def length_reward(prompts, completions, **columns):
    return torch.tensor([float(len(c)) for c in completions])


def test_weighted_sum_with_missing_eos_penalty(tokenizer):
    """Completions "3" (stopped, correct) and "12" (cut off, wrong), weights 2 (exact match) and
    -0.5 (length), penalty 1 for the one without a stop token:
        row 0: 2 * 1 - 0.5 * 1 = 1.5;    row 1: 2 * 0 - 0.5 * 2 - 1 = -2."""
    responses = responses_of(tokenizer, [ask("1+2"), ask("3+4")], ["3", "12"], stopped=[True, False], answer=["3", "7"])
    scorer = RewardScorer(
        [RewardFunction(exact_match_reward, weight=2.0), RewardFunction(length_reward, weight=-0.5)],
        missing_eos_penalty=1.0,
    )
    out = scorer(responses)
    torch.testing.assert_close(out.scores, torch.tensor([1.5, -2.0]))
    torch.testing.assert_close(out.per_source["length_reward"], torch.tensor([1.0, 2.0]))


def test_running_moments_match_the_whole_stream():
    """Batches (1, 3) then (5,): mean 3, population variance ((1-3)^2 + 0 + (5-3)^2) / 3 = 8/3."""
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 3.0]))
    moments.update(torch.tensor([5.0]))
    torch.testing.assert_close(moments.mean, torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(moments.std, torch.tensor((8 / 3) ** 0.5, dtype=torch.float64))


def test_normalisation_then_clipping(tokenizer):
    """Scores (0, 4): running mean 2, std 2 -> (-1, 1); clip 0.5 -> (-0.5, 0.5)."""
    responses = responses_of(tokenizer, [ask("1"), ask("2")], ["", "abcd"])
    scorer = RewardScorer([RewardFunction(length_reward)], normalize=True, clip=0.5)
    torch.testing.assert_close(scorer(responses).scores, torch.tensor([-0.5, 0.5]))
    assert "moments.mean" in scorer.state_dict()


def test_reward_model_folder_scores_the_last_real_token(tokenizer, reward_model_dir):
    """Left-padded prompts and right-padded responses score as each sequence does alone, where
    Hugging Face's own pooling (last non-pad token, positions from 0) is right by construction."""
    prompts, completions = [ask("1+2"), ask("12+34")], ["3", "46"]
    responses = responses_of(tokenizer, prompts, completions, stopped=[True, False])
    source = RewardModel(reward_model_dir)
    source.setup(tokenizer)
    assert source.shares_tokens
    scores = source(responses)
    reference = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for i in range(2):
        alone = responses.input_ids[i][responses.attention_mask[i].bool()][None]
        with torch.no_grad():
            expected = reference(input_ids=alone).logits[0, 0]
        torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-5)
    source.train()  # as its owner's fit does: a frozen model stays in eval mode
    assert not any(p.requires_grad for p in source.parameters()) and not source.model.model.training


def test_retokenized_path_reproduces_the_shared_tokens(tokenizer, reward_model_dir):
    """With the policy's own tokenizer, re-rendering a stopped response through the chat template
    gives back exactly its tokens, so both paths score alike."""
    responses = responses_of(tokenizer, [ask("1+2"), ask("12+34")], ["3", "46"])
    source = RewardModel(reward_model_dir)
    source.setup(tokenizer)
    shared = source(responses)
    source.shares_tokens = False
    torch.testing.assert_close(source(responses), shared, rtol=1e-5, atol=1e-5)


def test_per_token_rewards_by_hand():
    """kl = (0.1, 0.2 | 0.4, pad), scores (1, -1), kl_coef 0.5: row 0 -> (-0.05, -0.1 + 1),
    row 1 (one token) -> (-0.2 - 1, 0)."""
    kl = torch.tensor([[0.1, 0.2], [0.4, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    rewards = per_token_rewards(kl, torch.tensor([1.0, -1.0]), mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.9], [-1.2, 0.0]], dtype=torch.float64))


def test_the_score_lands_on_the_policys_last_token_of_a_multi_turn_row():
    """Policy tokens at 0, 1 and 4 (the environment's at 2, 3): the score goes to position 4, the
    last token the policy wrote, never to a reply token or padding. kl = 0.1 everywhere, kl_coef 1,
    score 2: r = (-0.1, -0.1, 0, 0, -0.1 + 2, 0)."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    rewards = per_token_rewards(torch.full((1, 6), 0.1), torch.tensor([2.0]), mask, kl_coef=1.0)
    assert torch.allclose(rewards, torch.tensor([[-0.1, -0.1, 0.0, 0.0, 1.9, 0.0]]))
