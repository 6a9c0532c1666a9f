"""The sampler's own log-probabilities of the tokens it samples, recorded inside `generate`: what
off-policy correction compares the trainer's log-probs with (`plpost.losses.off_policy_weights`)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


class SampledTokenLogprobs(LogitsProcessor):
    """A logits processor that changes nothing and records log pi_sampler(y_t) of every sampled token.

    `generate` runs the processors it is given before its sampling warpers (temperature, top_k,
    top_p), so this one applies the same warpers, transformers' own classes with generate's
    settings and order, to a copy of the scores: the log-prob recorded is that of the distribution
    the token is drawn from, computed in the sampler's forward (KV cache, its dtype and kernels).
    The token drawn from a step's scores is known at the next call (the last column of input_ids),
    so one step's (B, V) log-probs are kept at a time; `finish` takes the last token's.
    """

    def __init__(self, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        self.previous: Tensor | None = None
        self.recorded: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.recorded.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        warped = scores
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        self.previous = torch.log_softmax(warped.float(), dim=-1)
        return scores

    def finish(self, sequences: Tensor, response_length: int) -> Tensor:
        """(B, response_length) log-probs of the sampled responses, the last columns of `sequences`;
        NaN past what was generated (rows that stopped early are masked there anyway)."""
        if self.previous is not None:
            self.recorded.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
        self.previous = None
        logprobs = torch.stack(self.recorded, dim=1) if self.recorded else sequences.new_zeros((len(sequences), 0))
        self.recorded = []
        return widen_logprobs(logprobs.float(), response_length)


def widen_logprobs(logprobs: Tensor, width: int) -> Tensor:
    """(B, T) log-probs right-padded with NaN (no log-prob) to `width` columns."""
    extra = width - logprobs.shape[1]
    if extra <= 0:
        return logprobs
    return torch.cat([logprobs, logprobs.new_full((len(logprobs), extra), float("nan"))], dim=1)


def replace_logprob_rows(logprobs: Tensor, rows: Tensor, new: Tensor) -> Tensor:
    """`logprobs` with `rows` replaced by `new` (resampled rows), both widened to the wider of the two."""
    width = max(logprobs.shape[1], new.shape[1])
    logprobs = widen_logprobs(logprobs, width).clone()
    logprobs[rows] = widen_logprobs(new, width)
    return logprobs
