"""The sampler (plpost.sampling): the cached loop gives `generate`'s tokens, greedy, and sampled from
the same seed when it draws generate's random numbers, with one prefill per distinct prompt and
finished rows dropped; with its own draw (one uniform number per token) it samples from the
model's distribution, after the group's cache is copied too."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from plpost.generation import encode_prompts, generation_config
from plpost.hf import load_causal_lm
from plpost.sampling import choose_backend, complete, inverse_cdf_draw, prompt_groups, sampling_backend
from conftest import TINY

PROMPTS = [[{"role": "user", "content": "12+34"}], "1", [{"role": "user", "content": "what is 5+5? " * 3}]]


@pytest.fixture(scope="module")
def model():
    return load_causal_lm(TINY).eval()


def forward_rows(model):
    """Records the batch size of every forward of `model`; returns the list and the hook handle."""
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    return rows, handle


def both_backends(model, input_ids, attention_mask, config, num_samples, seed=0, loop="cached-exact"):
    """`generate`'s completions and the cached loop's (`loop`), each from `seed`."""
    outputs = {}
    for backend in ("generate", loop):
        torch.manual_seed(seed)
        outputs[backend] = complete(model, input_ids, attention_mask, config, num_samples=num_samples, backend=backend)
    return outputs["generate"], outputs[loop]


def test_greedy_completions_equal_generate(model, tokenizer):
    """Left-padded prompts of three lengths, 2 per prompt: the same tokens, the same width (both
    stop when the last row has), and the pad token after each stop."""
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS)
    config = generation_config(tokenizer, do_sample=False, max_new_tokens=12)
    expected, cached = both_backends(model, input_ids, attention_mask, config, num_samples=2, loop="cached")
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_completions_equal_generate_from_the_same_seed_with_rows_dropped(model, tokenizer, seed):
    """The cached loop drawing generate's random numbers ("cached-exact"). Temperature, top-k and
    top-p on; 30 more token ids count as stops so that rows finish early and leave the batch (the forwards get narrower) while the rest keep sampling: still
    generate's tokens, since every step draws from a matrix of all B * G rows as generate does."""
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS)
    config = generation_config(tokenizer, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=24)
    config.eos_token_id = [*config.eos_token_id, *range(10 + 7 * seed, 40 + 7 * seed)]
    torch.manual_seed(seed)
    expected = complete(model, input_ids, attention_mask, config, num_samples=5, backend="generate")
    rows, handle = forward_rows(model)
    try:
        torch.manual_seed(seed)
        cached = complete(model, input_ids, attention_mask, config, num_samples=5, backend="cached-exact")
    finally:
        handle.remove()
    assert torch.equal(cached, expected)
    assert rows[0][0] == 3  # one prefill per prompt
    assert max(shape[0] for shape in rows[1:]) <= 15 and min(shape[0] for shape in rows[1:]) < 15  # rows left


def test_a_group_the_caller_repeated_is_prefilled_once(model, tokenizer):
    """Prompts repeated by the caller (as the online stages and the sampled report do) are
    recognised as groups of consecutive equal rows: 3 prefill rows for 6 input rows."""
    input_ids, attention_mask = encode_prompts(tokenizer, [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[2],
                                                           PROMPTS[0]])
    assert prompt_groups(input_ids, attention_mask).tolist() == [0, 0, 1, 2, 2, 3]
    config = generation_config(tokenizer, do_sample=True, top_k=0, max_new_tokens=6)
    torch.manual_seed(0)
    expected = complete(model, input_ids, attention_mask, config, backend="generate")
    rows, handle = forward_rows(model)
    try:
        torch.manual_seed(0)
        cached = complete(model, input_ids, attention_mask, config, backend="cached-exact")
    finally:
        handle.remove()
    assert torch.equal(cached, expected)
    assert rows[0][0] == 4 and rows[1][0] == 6  # 4 prefill rows, then the 6 rows decode


def chi_square_bound(degrees: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z = 3.09), Wilson-Hilferty: df (1 - 2/(9 df) + z sqrt(2/(9 df)))^3."""
    a = 2 / (9 * degrees)
    return degrees * (1 - a + z * math.sqrt(a)) ** 3


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the categories of expected count >= 5 (the rest pooled into one),
    and its degrees of freedom."""
    kept = expected >= 5
    if not kept.all():
        observed = torch.cat([observed[kept], observed[~kept].sum().view(1)])
        expected = torch.cat([expected[kept], expected[~kept].sum().view(1)])
    observed, expected = observed.double(), expected.double()
    return float(((observed - expected) ** 2 / expected).sum()), int(expected.numel()) - 1


def test_one_uniform_per_row_draws_each_token_with_its_probability():
    """p = (0.1, 0, 0.6, 0.3, 0) in 100000 rows: token k comes when u falls in [F(k-1), F(k)), so
    the counts follow 100000 p (chi-square at level 0.001) and the tokens of probability 0, one of
    them last (where u * total rounding up would land), never come."""
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0]).repeat(100_000, 1)
    counts = torch.bincount(inverse_cdf_draw(probs), minlength=5)
    assert counts[1] == 0 and counts[4] == 0
    statistic, degrees = chi_square(counts[[0, 2, 3]], 100_000 * torch.tensor([0.1, 0.6, 0.3]))
    assert statistic < chi_square_bound(degrees)


def test_the_second_token_follows_the_models_distribution(model, tokenizer):
    """4000 completions of one prompt, 2 tokens each. The second token comes from the decode step
    on the cache copied across the group; among the rows whose first token is the most frequent
    one, t*, its counts are tested against softmax(model(prompt + t*)) with Pearson's chi-square
    at level 0.001."""
    input_ids, attention_mask = encode_prompts(tokenizer, [PROMPTS[0]])
    config = generation_config(tokenizer, do_sample=True, top_k=0, max_new_tokens=2)
    config.eos_token_id = [tokenizer.eos_token_id]
    torch.manual_seed(123)
    completions = complete(model, input_ids, attention_mask, config, num_samples=4000, backend="cached")
    first = completions[:, 0].mode().values
    second = completions[completions[:, 0] == first, 1]
    with torch.no_grad():
        logits = model(torch.cat([input_ids, first.view(1, 1)], dim=1)).logits[0, -1]
    expected = logits.softmax(-1).double() * second.numel()
    statistic, degrees = chi_square(torch.bincount(second, minlength=expected.numel()), expected)
    assert second.numel() > 500 and degrees > 5
    assert statistic < chi_square_bound(degrees)


def test_a_lora_policy_samples_generates_tokens(model, tokenizer):
    """A peft LoRA policy (adapter weights non-zero, so it differs from the base) takes the cached loop."""
    torch.manual_seed(0)
    lora = get_peft_model(load_causal_lm(TINY), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS)
    config = generation_config(tokenizer, do_sample=True, temperature=0.8, top_k=0, max_new_tokens=8)
    assert choose_backend(lora, config) == "cached"
    expected, cached = both_backends(lora, input_ids, attention_mask, config, num_samples=3)
    assert torch.equal(cached, expected)
    base, _ = both_backends(model, input_ids, attention_mask, config, num_samples=3)
    assert not torch.equal(base, cached)  # the adapter is in the tokens


def test_settings_the_loop_lacks_go_to_generate_and_a_choice_can_be_forced(model, tokenizer):
    """A repetition penalty is generate's alone; `sampling_backend` names the backend for a block."""
    config = generation_config(tokenizer, do_sample=False, max_new_tokens=4)
    assert choose_backend(model, config) == "cached"
    assert choose_backend(model, generation_config(tokenizer, repetition_penalty=1.3, max_new_tokens=4)) == "generate"
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS[:1])
    rows, handle = forward_rows(model)
    try:
        with sampling_backend("generate"):
            complete(model, input_ids.repeat(2, 1), attention_mask.repeat(2, 1), config)
    finally:
        handle.remove()
    assert rows[0][0] == 2  # generate prefilled both copies
    with pytest.raises(ValueError, match="sampling backend 'vllm'"):
        with sampling_backend("vllm"):
            pass
