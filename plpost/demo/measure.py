"""What the demo measures on the held-out problems: each policy's row, who ranks answers right,
which answer style a policy writes, the RLHF runs' proxy, gold and KL as they train, and how the
tool policies answer with the calculator on offer and without it."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from plpost.demo.data import MAX_NEW_TOKENS, STYLES, TOOL_TURN_TOKENS, calculator_environment, problem_of, style_of
from plpost.demo.data import styled_answer_correct
from plpost.evaluation import completion_logprobs, episode_report, greedy_report, learned_rewards, sampled_report
from plpost.generation import generate_texts
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.tasks.addition import exact_match_reward

ANSWER_FORMAT = r"[0-9]+"
KL_SAMPLES_PER_PROMPT = 4


def prompts_and_answers(rows: Sequence[dict]) -> tuple[list, dict[str, list[str]]]:
    return [row["prompt"] for row in rows], {"answer": [row["answer"] for row in rows]}


def policy_row(path: str, reference, tokenizer, rows: Sequence[dict], reward: str) -> dict[str, float]:
    """Greedy chat format and exact match (all, with a carry, without), the probability of the correct
    answer, exact match of samples at temperature 1, the reward model's score of the greedy answers,
    and the sampled KL to the SFT model (`reference`; 0 for it)."""
    policy = load_causal_lm(path)
    prompts, columns = prompts_and_answers(rows)
    carry = torch.tensor([row["has_carry"] for row in rows])
    greedy = greedy_report(policy, tokenizer, prompts, exact_match_reward, columns, answer_format=ANSWER_FORMAT,
                           max_new_tokens=MAX_NEW_TOKENS)
    sampled = sampled_report(policy, reference, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                             samples_per_prompt=KL_SAMPLES_PER_PROMPT)
    repeated_answers = [answer for answer in columns["answer"] for _ in range(KL_SAMPLES_PER_PROMPT)]
    return {
        "format": float(greedy.well_formed.float().mean()),
        "accuracy": float(greedy.scores.mean()),
        "accuracy_carry": float(greedy.scores[carry].mean()),
        "accuracy_no_carry": float(greedy.scores[~carry].mean()),
        "p_correct": float(completion_logprobs(policy, tokenizer, prompts, columns["answer"]).exp().mean()),
        "sampled_accuracy": float(exact_match_reward(sampled.prompts, sampled.completions, repeated_answers).mean()),
        "reward": float(learned_rewards(reward, tokenizer, prompts, greedy.completions).mean()),
        "kl_to_sft": float(sampled.kl.mean()),
    }


def episode_shares(statistics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Of an episode report's statistics: the share of episodes that call a tool at least once, the
    share with at least one malformed turn (a call the parser could not read), and the mean turns."""
    return {
        "tool_call_rate": float((statistics["tool_calls"] >= 1).float().mean()),
        "malformed_rate": float((statistics["malformed"] >= 1).float().mean()),
        "turns": float(statistics["turns"].float().mean()),
    }


def tool_row(path: str, rows: Sequence[dict]) -> dict[str, float]:
    """Greedy exact match with the `add` tool on offer (episodes, the last turn graded) and without
    it (the plain one-turn prompt), and how the episodes went (`episode_shares`)."""
    policy, tokenizer = load_causal_lm(path), load_tokenizer(path)
    prompts, columns = prompts_and_answers(rows)
    episodes = episode_report(policy, tokenizer, calculator_environment(), prompts, exact_match_reward, columns,
                              max_new_tokens=TOOL_TURN_TOKENS)
    plain = greedy_report(policy, tokenizer, prompts, exact_match_reward, columns, max_new_tokens=MAX_NEW_TOKENS)
    return {"accuracy_with_tool": float(episodes.scores.mean()), "accuracy_without_tool": float(plain.scores.mean()),
            **episode_shares(episodes.statistics)}


def held_out_pairs(rows: Sequence[dict], sft_pairs: Sequence[dict]) -> dict[str, list[tuple]]:
    """(prompt, chosen, rejected) on the held-out problems: the correct sum against the plausible
    mistake ("plausible"), and the SFT model's checker-labelled pairs of its own samples ("sft_samples")."""
    return {
        "plausible": [(row["prompt"], row["answer"], problem_of(row["prompt"]).plausible_mistake) for row in rows],
        "sft_samples": [(pair["prompt"], pair["chosen"][0]["content"], pair["rejected"][0]["content"]) for pair in sft_pairs],
    }


def ranking_accuracies(pairs: Sequence[tuple], tokenizer, sft: str, reward_models: dict[str, str],
                       preference_policies: dict[str, str]) -> dict[str, float]:
    """Share of pairs (prompt, chosen, rejected) each ranks right: the SFT model by its own
    likelihood, each reward model by its score, each preference-tuned policy by DPO's implicit
    reward log pi(y|x) - log pi_sft(y|x)."""
    prompts = [pair[0] for pair in pairs]
    chosen, rejected = [pair[1] for pair in pairs], [pair[2] for pair in pairs]
    sft_model = load_causal_lm(sft)

    def logps(model):
        return completion_logprobs(model, tokenizer, prompts, chosen), completion_logprobs(model, tokenizer, prompts, rejected)

    sft_chosen, sft_rejected = logps(sft_model)
    accuracies = {"sft_likelihood": float((sft_chosen > sft_rejected).float().mean())}
    for name, path in reward_models.items():
        margin = learned_rewards(path, tokenizer, prompts, chosen) - learned_rewards(path, tokenizer, prompts, rejected)
        accuracies[f"reward_{name}"] = float((margin > 0).float().mean())
    for name, path in preference_policies.items():
        policy_chosen, policy_rejected = logps(load_causal_lm(path))
        margin = (policy_chosen - sft_chosen) - (policy_rejected - sft_rejected)
        accuracies[f"implicit_{name}"] = float((margin > 0).float().mean())
    return accuracies


def style_shares(path: str, tokenizer, rows: Sequence[dict]) -> dict[str, float]:
    """Shares of greedy answers in each style, and of answers correct in either style."""
    prompts = [row["prompt"] for row in rows]
    texts = generate_texts(load_causal_lm(path), tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS).texts
    styles = [style_of(text) for text in texts]
    shares = {name: sum(style == name for style in styles) / len(texts) for name in STYLES}
    return {**shares, "correct": sum(styled_answer_correct(prompt, text) for prompt, text in zip(prompts, texts)) / len(texts)}


class HeldOutProbe(L.Callback):
    """Measures a PPO policy as it trains, every `every` rollouts and before the first: on samples at
    temperature 1 of the held-out prompts of `rows`, the reward model's score (the proxy it
    optimises), exact match (the gold it never sees) and the KL to the SFT model."""

    def __init__(self, rows: Sequence[dict], reward: str, sft: str, every: int) -> None:
        self.rows, self.reward, self.every = list(rows), reward, every
        self.sft = sft
        self.points: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reference = load_causal_lm(self.sft)
        self.tokenizer = load_tokenizer(self.sft)
        self.measure(pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        rollouts = int(pl_module.rollouts)
        if rollouts % self.every == 0:
            self.measure(pl_module, rollouts)

    def measure(self, pl_module: L.LightningModule, rollouts: int) -> None:
        prompts, columns = prompts_and_answers(self.rows)
        report = sampled_report(pl_module.policy, self.reference, self.tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                samples_per_prompt=2, seed=rollouts)
        answers = [answer for answer in columns["answer"] for _ in range(2)]
        self.points.append({
            "rollouts": rollouts, "kl_to_sft": float(report.kl.mean()),
            "reward": float(learned_rewards(self.reward, self.tokenizer, report.prompts, report.completions).mean()),
            "accuracy": float(exact_match_reward(report.prompts, report.completions, answers).mean()),
        })
