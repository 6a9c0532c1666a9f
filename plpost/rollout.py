"""Sampling for the online stages (PPO, GRPO, distillation): responses from the sampler
(`plpost.sampling`) cut after their stop token, and the one forward pass over (prompt + response)
that both the rollout and the PPO update use.

Sharing `response_forward` is what makes PPO's ratio exactly 1 until the first optimizer step:
the old log-probs and the log-probs being trained come from the same function, on the same
tokens, position ids, mask and temperature, in the same dtype path (under the Trainer's autocast
in both), and in the same micro-batches (see `plpost.modules.online.forward_in_layout`).

What is not recomputed: the sampled tokens, which responses stopped and where (all from
the sampler's output). What is: the log-probs of the sampled tokens. The sampler has the
logits, but they come from the cached, one-token-at-a-time decode, whose floating-point results
differ from a full forward's in the last bits, which would make the first ratio merely close
to 1. The full forward costs one pass over the batch and also yields the value head's hidden states.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from plpost.generation import completion_stats
from plpost.losses import explained_variance, masked_mean, masked_sum, token_entropy, token_logprobs
from plpost.sampling import complete


class Samples(NamedTuple):
    """Sampled responses after their prompts; R = response_mask.shape[1] response positions.

    input_ids: (B, P + R), the left-padded prompt then the response, padded after the stop token.
    attention_mask: (B, P + R), 1 on real prompt tokens and on response tokens up to the stop.
    position_ids: (B, P + R), counted from each row's first real token (0 on left padding).
    response_mask: (B, R) bool, True on the policy's tokens: up to and including the first stop
        token (all of the response when it never stopped); in a multi-turn episode
        (`plpost.episodes`), the policy's turns, the environment's replies between them False.
    stopped: (B,) bool, the response ended with a stop token within max_new_tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_mask: Tensor
    stopped: Tensor

    @property
    def response_ids(self) -> Tensor:
        """(B, R), pad after the stop token."""
        return self.input_ids[:, -self.response_mask.shape[1] :]


def position_ids_from(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, as in training (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig,
    *,
    pad_token_id: int,
    num_samples: int = 1,
    backend: str | None = None,
    logits_processor: list | None = None,
) -> Samples:
    """Samples `num_samples` responses per left-padded prompt with the sampler (`plpost.sampling`:
    one prefill per distinct prompt, KV cache on), those of a prompt consecutive.

    input_ids, attention_mask: (B, P) left-padded prompts. `config` says how to sample and
    which tokens stop (`config.eos_token_id`: EOS and end-of-turn, see `generation_config`).
    Everything after a response's first stop token is replaced by `pad_token_id` and masked out.
    The model is put in eval mode while it samples (with gradient checkpointing on, a model
    in train mode would refuse the KV cache) and given back in the mode it came in.
    logits_processor: extra processors `generate` runs after its own (e.g. `SampledTokenLogprobs`);
        given, the sampling is `generate`'s (see `plpost.sampling.complete`).
    """
    response, response_mask, stopped = sampled_completions(
        model, input_ids, attention_mask, config, pad_token_id=pad_token_id, num_samples=num_samples, backend=backend,
        logits_processor=logits_processor)
    if num_samples > 1:
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    return join_responses(input_ids, attention_mask, response, response_mask, stopped)


@torch.no_grad()
def sampled_completions(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, config: GenerationConfig, *, pad_token_id: int,
    num_samples: int = 1, backend: str | None = None, logits_processor: list | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(B * num_samples, R) completions with `pad_token_id` after each first stop token, their
    (B * num_samples, R) bool mask up to and including it, and (B * num_samples,) whether they
    stopped; sampled in eval mode, the model given back in the mode it came in (see `sample_responses`)."""
    was_training = model.training
    model.eval()
    try:
        response = complete(model, input_ids, attention_mask, config, num_samples=num_samples, backend=backend,
                            logits_processor=logits_processor)
    finally:
        model.train(was_training)
    lengths, stopped = completion_stats(response, config.eos_token_id)
    response_mask = torch.arange(response.shape[1], device=response.device) < lengths[:, None]
    return torch.where(response_mask, response, torch.full_like(response, pad_token_id)), response_mask, stopped


def join_responses(
    input_ids: Tensor, attention_mask: Tensor, response_ids: Tensor, response_mask: Tensor, stopped: Tensor
) -> Samples:
    """Left-padded prompts (B, P) followed by right-padded responses (B, R) (response_mask: bool,
    True on each response's tokens, a prefix of its row) as `Samples`."""
    full_mask = torch.cat([attention_mask.long(), response_mask.long()], dim=1)
    return Samples(
        input_ids=torch.cat([input_ids, response_ids], dim=1),
        attention_mask=full_mask,
        position_ids=position_ids_from(full_mask),
        response_mask=response_mask,
        stopped=stopped,
    )


def widen_responses(samples: Samples, width: int, *, pad_token_id: int) -> Samples:
    """`samples` with its response part right-padded to `width` positions (padding masked out)."""
    extra = width - samples.response_mask.shape[1]
    if extra <= 0:
        return samples
    rows = samples.input_ids.shape[0]
    input_ids = torch.cat([samples.input_ids, samples.input_ids.new_full((rows, extra), pad_token_id)], dim=1)
    attention_mask = torch.cat([samples.attention_mask, samples.attention_mask.new_zeros(rows, extra)], dim=1)
    response_mask = torch.cat([samples.response_mask, samples.response_mask.new_zeros(rows, extra)], dim=1)
    return Samples(input_ids, attention_mask, position_ids_from(attention_mask), response_mask, samples.stopped)


def replace_rows(samples: Samples, rows: Tensor, new: Samples, *, pad_token_id: int) -> Samples:
    """`samples` with `rows` (indices) replaced by the rows of `new`, sampled for the same prompts
    (same prompt width); the responses are padded to the wider of the two."""
    width = max(samples.response_mask.shape[1], new.response_mask.shape[1])
    samples = widen_responses(samples, width, pad_token_id=pad_token_id)
    new = widen_responses(new, width, pad_token_id=pad_token_id)
    fields = [field.clone() for field in samples]
    for field, replacement in zip(fields, new):
        field[rows] = replacement
    return Samples(*fields)


class Rollout(NamedTuple):
    """Everything one PPO update needs about a batch of sampled responses (no gradients anywhere).

    input_ids, attention_mask, position_ids: (B, P + R) prompt + response, as in `Samples`.
    response_mask: (B, R) bool; stopped: (B,) bool.
    logprobs, ref_logprobs: (B, R) log-probs of the response tokens under the sampling policy and
        the reference, both at the sampling temperature; values: (B, R) V(s_t) before each token.
    scores: (B,) the sequence-level reward of each response (after shaping, see `RewardScorer`).
    All per-token tensors are 0 where response_mask is False.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_mask: Tensor
    stopped: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor


def decode_completions(tokenizer: PreTrainedTokenizerBase, samples: Samples) -> list[str]:
    """Response texts with special tokens (the stop token, padding) removed."""
    return tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)


class ResponseForward(NamedTuple):
    """One forward over prompt + response, read at the R response positions (all (B, R, ...))."""

    logprobs: Tensor
    """(B, R) log softmax(logits / temperature) of each response token, 0 where response_mask is 0."""
    entropy: Tensor | None
    """(B, R) entropy of softmax(logits / temperature) before each response token, when asked."""
    hidden: Tensor | None
    """(B, R, H) last hidden state before each response token (for a value head), when asked."""


def forward_over_responses(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, length: int,
    *, with_hidden: bool = False,
):
    """The model's output with logits at the last `length` + 1 positions only (`logits_to_keep`: the
    LM head never runs on the prompt): position P + t - 1 predicts response token t, and the last
    position predicts nothing."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=length + 1,
        output_hidden_states=with_hidden,
        use_cache=False,
    )


def response_logits(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """(B, R, V) next-token logits before each response token (a view: nothing is copied); the
    arguments as for `response_forward`."""
    length = response_mask.shape[1]
    return forward_over_responses(model, input_ids, attention_mask, position_ids, length).logits[:, :length]


def response_forward(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    response_mask: Tensor,
    *,
    temperature: float,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> ResponseForward:
    """Per-response-token log-probs (and optionally entropies, hidden states) in one forward.

    input_ids, attention_mask, position_ids: (B, P + R) as in `Samples`; response_mask: (B, R).
    Response token t sits at position P + t and is predicted from position P + t - 1, so only
    the last R + 1 positions get logits (see `forward_over_responses`; no (B, T, V) tensor is
    sliced).
    Gradients flow when called with grad enabled (the PPO update); the rollout calls it
    under no_grad.
    """
    length = response_mask.shape[1]
    out = forward_over_responses(model, input_ids, attention_mask, position_ids, length, with_hidden=with_hidden)
    response_ids = input_ids[:, -length:]
    targets = torch.where(response_mask, response_ids, torch.full_like(response_ids, -100))
    targets = torch.cat([targets, torch.full_like(targets[:, :1], -100)], dim=1)  # (B, R + 1)
    logprobs = token_logprobs(out.logits, targets, temperature=temperature)[:, :length]
    entropy = None
    if with_entropy:
        entropy_mask = torch.cat([response_mask, torch.zeros_like(response_mask[:, :1])], dim=1)
        entropy = token_entropy(out.logits, entropy_mask, temperature=temperature)[:, :length]
    hidden = out.hidden_states[-1][:, -(length + 1) : -1] if with_hidden else None
    return ResponseForward(logprobs, entropy, hidden)


def rollout_statistics(rollout: Rollout, sequence_kl: Tensor, rewards: Tensor, returns: Tensor) -> dict[str, Tensor]:
    """Per-rollout means (TRL's names where it has them).

    sequence_kl: (B,) summed KL estimate per response; rewards, returns: (B, R) per-token rewards
    (KL penalty and score) and value targets. The entropy is the sampled estimate -sum log pi of
    each response, which costs nothing; the exact one needs the logits (see `entropy_coef`).
    """
    mask = rollout.response_mask
    non_score = masked_sum(rewards, mask, dim=1) - rollout.scores
    return {
        "objective/kl": sequence_kl.mean(),
        "objective/entropy": -masked_sum(rollout.logprobs, mask, dim=1).mean(),
        "objective/scores": rollout.scores.mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": (rollout.scores + non_score).mean(),
        "val/explained_variance": explained_variance(rollout.values, returns, mask),
        "val/value_mean": masked_mean(rollout.values, mask),
        "rollout/response_length": mask.sum(1).float().mean(),
        "rollout/stopped": rollout.stopped.float().mean(),
    }
