"""The sampler: completions for left-padded prompts, G per prompt, behind one interface.

`complete(model, input_ids, attention_mask, config, num_samples=G)` returns what `model.generate`
returns after the prompt for the prompts each repeated G times: (B * G, R) token ids, the G of a
prompt consecutive, the pad token after a row's first stop token, R the number of steps until
every row stopped (at most `max_new_tokens`). A backend computes it; `choose_backend` picks one
(``"auto"``), `sampling_backend(name)` or the `backend` argument names one:

- ``"generate"``: transformers' `generate` on the repeated prompts, the reference.
- ``"cached"``: plpost's own decode loop. One prefill per distinct prompt (also for prompts the
  caller repeated itself: consecutive equal rows share it), its KV cache then copied across the
  rows of the group, so (G - 1) / G of the prompt work is never done; one forward per new token
  with none of `generate`'s per-step machinery; and finished rows dropped from the batch and the
  cache once they are a quarter of it, so the forwards carry rows still at work.

The two draw the same random numbers in the same order: each step samples with
`torch.multinomial` from a (B * G, V) matrix of probabilities, `generate`'s rows for the rows at
work (a finished row holds a placeholder row; `generate` replaces what it draws there by the
pad), after the same warpers. So the same seed gives the same tokens, greedy decoding included,
wherever a row's logits do not depend on which other rows share its batch (bitwise, on CPU, in
every case tests/test_sampling.py checks; on a GPU, kernels may pick another reduction order for
another batch size, and then the distribution is still the same: the test also checks it with a
statistical test).

Where another engine plugs in (vLLM colocated on a GPU, as TRL and verl run it): a backend is a
function with `complete`'s arguments and result, registered in `BACKENDS` and named by
`sampling_backend` or picked by `choose_backend`. One that keeps its own copy of the weights
refreshes it when the model's weights changed since it last sampled: the online stages sample
only between optimizer steps, and inside their sharded-weights context
(`plpost.sharding.full_parameters`), where the model it is handed holds the full, current
weights (see docs/sampling.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

UNSYNCED = False
"""`generate`'s `synced_gpus`: transformers turns it on for a model that FSDP2 shards, and then
all-reduces at every new token so that the ranks step until the last one is done. plpost
gathers the full weights for the whole sampling call (`plpost.sharding.full_parameters`), so its
forwards need no collective: each rank samples on its own and stops when its rows are done, and
a rank with nothing to sample need not sample at all."""

COMPACT_SHARE = 0.25
"""Finished rows leave the batch once they are this share of the rows in it: copying the cache
without them costs about what a decode step does, so dropping each as it finishes would not pay."""

NEUTRAL_SETTINGS = {
    "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "min_p": None, "top_h": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None, "guidance_scale": None,
    "stop_strings": None, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "watermarking_config": None, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False, "cache_implementation": None, "prompt_lookup_num_tokens": None,
    "penalty_alpha": None, "dola_layers": None, "use_cache": True,
}
"""`generate` settings the cached loop implements only at these values (None counts as unset)."""


def generate_backend(model, input_ids: Tensor, attention_mask: Tensor, config: GenerationConfig, num_samples: int,
                     streamer=None, logits_processor: list | None = None) -> Tensor:
    if num_samples > 1:
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    extra = {"streamer": streamer} if streamer is not None else {}
    if logits_processor is not None:
        extra["logits_processor"] = logits_processor
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            synced_gpus=UNSYNCED, **extra)
    return output[:, input_ids.shape[1] :]


def logits_warpers(config: GenerationConfig) -> LogitsProcessorList:
    """The warpers `generate` applies when it samples, in its order: temperature, top-k, top-p."""
    warpers = LogitsProcessorList()
    if config.do_sample and config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.do_sample and config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.do_sample and config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return warpers


def base_model(model):
    """The transformers model under a peft wrapper (the model itself without one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolved_config(model, config: GenerationConfig) -> GenerationConfig:
    """`config` with what it leaves unset filled in as `generate` fills it: from the model's own
    generation config, then transformers' defaults (top_k 50, for one)."""
    return base_model(model)._prepare_generation_config(config)[0]


def unsupported_settings(config: GenerationConfig) -> list[str]:
    """The settings of a resolved `config` that the cached loop does not implement."""
    unsupported = [name for name, neutral in NEUTRAL_SETTINGS.items()
                   if getattr(config, name, None) not in (None, neutral)]
    if config.max_new_tokens is None:
        unsupported.append("max_new_tokens (unset: the loop counts new tokens, not the total length)")
    return unsupported


def prompt_groups(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) the index of each row's group of consecutive equal prompts (0, 0, 1, 2, 2, ...)."""
    same = (input_ids[1:] == input_ids[:-1]).all(dim=1) & (attention_mask[1:] == attention_mask[:-1]).all(dim=1)
    starts = torch.cat([same.new_ones(1), ~same])
    return starts.long().cumsum(0) - 1


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers reserved for the whole completion:
    each step writes its token's in place, where `DynamicLayer` copies the whole cache
    (`torch.cat`). Attention reads the same values over the same length (a view of the buffer)."""

    def __init__(self, layer: DynamicLayer, capacity: int) -> None:
        super().__init__()
        self.device, self.is_initialized, self.length = layer.keys.device, True, layer.keys.shape[-2]
        self.key_buffer, self.value_buffer = (
            torch.cat([states, states.new_empty(*states.shape[:-2], capacity - self.length, states.shape[-1])], dim=-2)
            for states in (layer.keys, layer.values))
        self.keys, self.values = self.views()

    def views(self) -> tuple[Tensor, Tensor]:
        return self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        new = key_states.shape[-2]
        self.key_buffer[..., self.length : self.length + new, :] = key_states
        self.value_buffer[..., self.length : self.length + new, :] = value_states
        self.length += new
        self.keys, self.values = self.views()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.views()


def reserve(cache, capacity: int):
    """`cache` with its plain dynamic layers (not sliding-window or other kinds) reserved to `capacity` positions."""
    cache.layers = [ReservedLayer(layer, capacity) if type(layer) is DynamicLayer and layer.is_initialized else layer
                    for layer in cache.layers]
    return cache


def inverse_cdf_draw(probs: Tensor) -> Tensor:
    """(B,) one token per row of (B, V) probabilities from one uniform number per row: the first
    token whose cumulative probability exceeds u * total (in float64, so rounding moves no mass
    onto a token of probability 0; the clamp catches u * total rounding up to the total)."""
    cumulative = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cumulative[:, -1:]
    last_possible = probs.shape[1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(torch.searchsorted(cumulative, u, right=True).squeeze(1), last_possible)


def generate_draw(probs: Tensor, live: Tensor, rows: int) -> Tensor:
    """`generate`'s draw: `torch.multinomial` over all `rows` rows (the batch's `live` rows hold
    `probs`, a finished row a placeholder), one exponential number per vocabulary entry and row."""
    if probs.shape[0] != rows:
        full = probs.new_zeros(rows, probs.shape[1])
        full[:, 0] = 1.0
        full[live] = probs
        probs = full
    return torch.multinomial(probs, num_samples=1).squeeze(1)[live]


@torch.no_grad()
def cached_backend(model, input_ids: Tensor, attention_mask: Tensor, config: GenerationConfig, num_samples: int,
                   streamer=None, *, generate_draws: bool = False) -> Tensor:
    if input_ids.shape[0] == 0:
        return input_ids.new_zeros(0, 0)
    config = resolved_config(model, config)
    device, width = input_ids.device, config.max_new_tokens
    stop_ids = torch.as_tensor(stop_token_list(config), dtype=torch.long, device=device)
    pad = config.pad_token_id if config.pad_token_id is not None else int(stop_ids[0])
    warpers = logits_warpers(config)
    groups = prompt_groups(input_ids, attention_mask).repeat_interleave(num_samples)
    heads = torch.cat([groups.new_ones(1), groups[1:] != groups[:-1]]).nonzero().squeeze(1)
    rows = groups.shape[0]
    first = heads // num_samples  # the input row each distinct prompt is prefilled from
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    out = model(input_ids=input_ids[first], attention_mask=attention_mask[first], position_ids=positions[first],
                use_cache=True, logits_to_keep=1)
    cache = reserve(out.cache, input_ids.shape[1] + width)
    if heads.shape[0] != rows:
        cache.batch_select_indices(groups)
    logits = out.logits[:, -1].float()[groups]
    attention_mask = attention_mask[first][groups]
    next_position = positions[first][groups][:, -1:] + 1
    if streamer is not None:
        streamer.put(input_ids.cpu())
    completions = torch.full((rows, width), pad, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # the batch's rows, as rows of `completions`
    finished = torch.zeros(rows, dtype=torch.bool, device=device)  # per row of the batch
    steps = 0
    while steps < width:
        scores = warpers(None, logits)  # the ids so far are for the processors this loop leaves to generate
        if not config.do_sample:
            tokens = scores.argmax(dim=-1)
        elif generate_draws:
            tokens = generate_draw(scores.softmax(dim=-1), live, rows)
        else:
            tokens = inverse_cdf_draw(scores.softmax(dim=-1))
        tokens = tokens.masked_fill(finished, pad)
        completions[live, steps] = tokens
        steps += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        finished = finished | torch.isin(tokens, stop_ids)
        done = int(finished.sum())
        if steps == width or done == finished.shape[0]:
            break
        if done and done >= COMPACT_SHARE * finished.shape[0]:
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, finished, tokens = live[keep], finished[keep], tokens[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_position,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    return completions[:, :steps]


def stop_token_list(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else [int(token) for token in eos]


def cached_exact_backend(*args) -> Tensor:
    return cached_backend(*args, generate_draws=True)


BACKENDS: dict[str, Callable[..., Tensor]] = {
    "generate": generate_backend, "cached": cached_backend, "cached-exact": cached_exact_backend,
}
chosen_backend: ContextVar[str] = ContextVar("chosen_backend", default="auto")


@contextmanager
def sampling_backend(name: str) -> Iterator[None]:
    """Every sampling call inside uses backend `name` (``"auto"``: `choose_backend`'s pick)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"sampling backend {name!r}: expected 'auto' or one of {sorted(BACKENDS)}")
    token = chosen_backend.set(name)
    try:
        yield
    finally:
        chosen_backend.reset(token)


def choose_backend(model, config: GenerationConfig) -> str:
    """``"cached"`` for a transformers decoder (peft-wrapped or not) whose forward takes a cache,
    with settings the loop implements; ``"generate"`` otherwise."""
    base = base_model(model)
    peft_config = getattr(model, "active_peft_config", None)
    if (not isinstance(base, PreTrainedModel) or base.config.is_encoder_decoder
            or "cache" not in inspect.signature(base.forward).parameters
            or getattr(peft_config, "is_prompt_learning", False)
            or unsupported_settings(resolved_config(model, config))):
        return "generate"
    return "cached"


@torch.no_grad()
def complete(model, input_ids: Tensor, attention_mask: Tensor, config: GenerationConfig, *, num_samples: int = 1,
             backend: str | None = None, streamer=None, logits_processor: list | None = None) -> Tensor:
    """(B * num_samples, R) completions of the left-padded prompts (B, P), those of a prompt
    consecutive, the pad token after each row's first stop token. The model samples in the mode
    it is in (callers put it in eval mode). `backend` overrides `sampling_backend`'s; `streamer`
    (a transformers streamer, one prompt) is handed each new token. `logits_processor`: processors
    for `generate`'s loop (off-policy correction records the sampler's log-probs with one), which
    the cached loop does not run: given, `generate` samples."""
    if logits_processor is not None:
        return generate_backend(model, input_ids, attention_mask, config, num_samples, streamer, logits_processor)
    name = backend or chosen_backend.get()
    if name == "auto":
        name = choose_backend(model, config)
    if name not in BACKENDS:
        raise ValueError(f"sampling backend {name!r}: expected 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[name](model, input_ids, attention_mask, config, num_samples, streamer)
