"""plpost.evaluation's completion log-probabilities, against a naive per-example forward; its
sampled KL report; its episode report, played in batches."""

import torch

from plpost.data.tokenize import chat_ids, prompt_ids
from plpost.episodes import EPISODE_STATISTICS
from plpost.evaluation import completion_logprobs, episode_report, sampled_report
from plpost.hf import load_causal_lm
from plpost.tasks.addition import TryAgain, exact_match_reward


def naive_completion_logprob(model, tokenizer, prompt, completion) -> float:
    """log p(completion | prompt) from one unpadded forward: the sum over the assistant turn's tokens of
    log softmax(logits at the position before each token)[token]."""
    head = prompt_ids(tokenizer, prompt)
    full = chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": completion}], add_generation_prompt=False)
    logits = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
    return sum(float(logits[position - 1, full[position]]) for position in range(len(head), len(full)))


@torch.no_grad()
def test_completion_logprobs_match_one_unpadded_forward_per_example(tokenizer):
    model = load_causal_lm("plpost:tiny").eval()
    prompts = [[{"role": "user", "content": "37+48"}], [{"role": "user", "content": "1+2 and then much more text"}]]
    completions = ["85", "a longer answer, padded against the short one"]
    batched = completion_logprobs(model, tokenizer, prompts, completions, batch_size=2)
    naive = torch.tensor([naive_completion_logprob(model, tokenizer, p, c) for p, c in zip(prompts, completions)])
    assert torch.allclose(batched, naive, atol=1e-4), (batched, naive)
    # The end-of-turn token is part of the completion: an empty answer still has one token to predict.
    assert float(completion_logprobs(model, tokenizer, prompts[:1], [""])[0]) < 0


@torch.no_grad()
def test_sampled_report_repeats_each_prompt_and_a_model_is_zero_nats_from_itself(tokenizer):
    model = load_causal_lm("plpost:tiny")
    prompts = [[{"role": "user", "content": "37+48"}], [{"role": "user", "content": "21+34"}]]
    state = torch.get_rng_state()
    report = sampled_report(model, model, tokenizer, prompts, max_new_tokens=4, samples_per_prompt=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left as it was
    assert report.prompts == [prompts[0]] * 3 + [prompts[1]] * 3 and len(report.completions) == 6
    assert torch.equal(report.kl, torch.zeros(6))
    # The same seed draws the same samples.
    again = sampled_report(model, model, tokenizer, prompts, max_new_tokens=4, samples_per_prompt=3)
    assert again.completions == report.completions


@torch.no_grad()
def test_episode_report_plays_in_batches_and_keeps_the_prompts_order(tokenizer):
    """Greedy episodes of prompts of one length (no padding differs between batches): played 2 at a
    time or all at once, the same episodes in the same order, scored on their last turns."""
    model = load_causal_lm("plpost:tiny")
    questions = ["37+48", "21+34", "59+26"]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    columns = {"answer": [str(eval(q)) for q in questions]}
    whole, split = (episode_report(model, tokenizer, TryAgain(max_turns=2), prompts, exact_match_reward, columns,
                                   max_new_tokens=4, batch_size=size) for size in (3, 2))
    assert split.conversations == whole.conversations and torch.equal(split.lengths, whole.lengths)
    assert all(torch.equal(split.statistics[name], whole.statistics[name]) for name in EPISODE_STATISTICS)
    assert torch.equal(whole.scores, exact_match_reward(prompts, whole.completions, columns["answer"]))


def test_episode_report_of_no_prompts_plays_nothing():
    report = episode_report(None, None, TryAgain(), [], exact_match_reward, {"answer": []})
    assert report.completions == [] and len(report.scores) == 0 and set(report.statistics) == set(EPISODE_STATISTICS)
