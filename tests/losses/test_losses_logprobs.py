"""Tests for plpost.losses.logprobs: targets, chunked log-probs and entropies, sequence sums."""

import math

import pytest
import torch

from plpost.losses import next_token_targets, sequence_logprobs, token_entropy, token_logprobs

F64 = torch.float64


def reference_logprobs(logits, targets, temperature=1.0, ignore_index=-100):
    """Naive float64 reference: full log_softmax, gather, zero the ignored positions."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    safe = targets.clamp_min(0)
    out = logp.gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(targets == ignore_index, torch.zeros_like(out), out)


def reference_entropy(logits, temperature=1.0):
    """Naive float64 reference: -sum_v p_v log p_v."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_next_token_targets_by_hand():
    """targets[:, t] = labels[:, t + 1]; the last position predicts nothing (-100)."""
    labels = torch.tensor([[5, 6, 7], [-100, 8, 9]])
    expected = torch.tensor([[6, 7, -100], [8, 9, -100]])
    assert torch.equal(next_token_targets(labels), expected)
    assert torch.equal(next_token_targets(labels, ignore_index=-1)[:, -1], torch.tensor([-1, -1]))


def test_token_logprobs_by_hand():
    """Logits (0, ln 3) give p = (1/4, 3/4). At temperature 2 they become (0, ln 3 / 2), so
    p_1 = sqrt(3) / (1 + sqrt(3)). An ignored target gives exactly 0."""
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 3], dtype=F64)
    targets = torch.tensor([[1, 0, -100]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25), 0.0]], dtype=F64)
    torch.testing.assert_close(token_logprobs(logits, targets), expected)
    s3 = math.sqrt(3.0)
    hot = token_logprobs(logits, targets, temperature=2.0)
    torch.testing.assert_close(hot[0, 0], torch.tensor(math.log(s3 / (1 + s3)), dtype=F64))


def test_token_logprobs_matches_float64_reference():
    """float64 in, float64 out, equal to the naive log_softmax-and-gather at default tolerance."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=F64) * 3
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, 2:] = -100
    for temperature in (1.0, 0.7):
        out = token_logprobs(logits, targets, temperature=temperature, chunk_size=4)
        assert out.dtype == F64
        torch.testing.assert_close(out, reference_logprobs(logits, targets, temperature))


@pytest.mark.parametrize(
    ("dtype", "temperature"),
    [(torch.bfloat16, 0.9), (torch.float32, 1.0), (torch.float32, 0.9)],
    ids=["bf16-upcast", "fp32-fused", "fp32-divided"],
)
def test_chunked_equals_unchunked_exactly(dtype, temperature):
    """Chunking only groups rows; each row is reduced on its own, so values and gradients are
    bit-identical for every chunk size (1, one that does not divide B*T, and one chunk), on each
    path: bf16 upcast per chunk, float32 through the fused log_softmax/softmax (temperature 1),
    float32 divided by the temperature."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 97, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 97, (3, 5), generator=g)
    targets[1, :2] = -100
    weights = torch.randn(3, 5, generator=g)

    def run(fn, chunk_size):
        x = logits.clone().requires_grad_(True)
        out = fn(x, chunk_size)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        return out, grad

    for fn in (
        lambda x, c: token_logprobs(x, targets, temperature=temperature, chunk_size=c),
        lambda x, c: token_entropy(x, temperature=temperature, chunk_size=c),
    ):
        full, full_grad = run(fn, 4096)
        for chunk_size in (1, 4, 15):
            out, grad = run(fn, chunk_size)
            assert torch.equal(out, full)
            assert torch.equal(grad, full_grad)


def test_bf16_large_vocab_matches_float64_reference():
    """bf16 logits over a 50k vocabulary. The reference takes the same bf16 values in float64, so
    the only error is our float32 arithmetic: |log p| <= |logit| + log V ~ 30 here, float32 eps is
    1.2e-7, and the 5e4-term sum in logsumexp adds O(log2(V) * eps) relative error; 1e-4 absolute
    leaves ~10x headroom over that. The naive bf16 log_softmax (no upcast) is off by ~0.1 (bf16
    eps 7.8e-3 times |log p|), so the test fails if the upcast goes missing."""
    g = torch.Generator().manual_seed(2)
    vocab = 50_257
    logits = (torch.randn(2, 8, vocab, generator=g) * 4).bfloat16()
    targets = torch.randint(0, vocab, (2, 8), generator=g)
    targets[1, -3:] = -100
    out = token_logprobs(logits, targets, chunk_size=5)
    assert out.dtype == torch.float32
    ref = reference_logprobs(logits, targets)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=0)
    naive = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1).double()
    assert ((naive - ref).abs() * (targets != -100)).max() > 1e-2


def test_huge_logits_are_stable():
    """|logit| ~ 1e4 would overflow exp() without the max-shift. In float64 the result is the
    reference at default tolerance. In float32/bf16 the log-normaliser (~1e4) is rounded to float32,
    whose spacing at 1e4 is 2^-10 ~ 9.8e-4; x - lse is then within one such ulp, so 2e-3."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.rand(2, 6, 1000, generator=g, dtype=F64) * 2 - 1) * 1e4
    logits[0, 0, 7] = 1e4  # a clear winner: log p close to 0
    targets = torch.randint(0, 1000, (2, 6), generator=g)
    targets[0, 0] = 7
    torch.testing.assert_close(token_logprobs(logits, targets), reference_logprobs(logits, targets))
    torch.testing.assert_close(token_entropy(logits), reference_entropy(logits))
    for dtype in (torch.float32, torch.bfloat16):
        low = logits.to(dtype)
        out = token_logprobs(low, targets)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), reference_logprobs(low, targets), atol=2e-3, rtol=0)
        assert torch.isfinite(token_entropy(low)).all()


def test_gradients_match_autograd_in_float64():
    """The hand-written backward (d log p_t / d x_j = (1[j = t] - p_j) / T, and
    dH / d x_j = -p_j (log p_j + H) / T) agrees with finite differences, for log-probs both at
    temperature 1 (fused log_softmax, softmax written into the gradient) and at 0.8 (each chunk
    divided, worked on in the gradient's rows)."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    targets = torch.tensor([[0, 4, -100], [2, 2, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    for temperature in (1.0, 0.8):
        assert torch.autograd.gradcheck(
            lambda x: token_logprobs(x, targets, temperature=temperature, chunk_size=4), (logits,)
        )
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, mask, temperature=1.3, chunk_size=4), (logits,))


def test_bf16_gradient_keeps_dtype_and_matches_reference():
    """The gradient is written in the logits' dtype (no float32 (B, T, V) buffer) and equals the
    float64 autograd gradient of the same bf16 values up to bf16 rounding (eps 7.8e-3, |grad| <= 1)."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 4, 300, generator=g) * 3).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 300, (2, 4), generator=g)
    (grad,) = torch.autograd.grad(token_logprobs(logits, targets, chunk_size=3).sum(), logits)
    assert grad.dtype == torch.bfloat16
    x = logits.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(reference_logprobs(x, targets).sum(), x)
    torch.testing.assert_close(grad.double(), ref, atol=4e-3, rtol=8e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_backward_saves_no_float32_copy_of_the_logits(dtype):
    """Autograd keeps only the logits themselves plus (B*T,)-sized tensors for backward: no float32
    copy of bf16 logits, and no log-softmax of float32 ones."""
    logits = torch.randn(2, 16, 1000).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 1000, (2, 16))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(logits, targets, chunk_size=8)
        token_entropy(logits, chunk_size=8)
    assert saved
    for t in saved:
        same_storage = t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        assert same_storage or t.numel() <= 2 * 16, (t.dtype, tuple(t.shape))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_logits_match_float64_reference(temperature):
    """float32 logits are never upcast: at temperature 1 each chunk goes through the fused
    log_softmax, and backward's softmax is written into the gradient; at 0.7 each chunk is divided
    into one buffer. Values and gradient equal the float64 autograd reference of the same float32
    values to float32 rounding (|log p| <= ~30 here, eps 1.2e-7, so 1e-5; |grad| <= 4), and
    ignored positions get exactly 0 and a zero gradient."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 9, 401, generator=g) * 4
    targets = torch.randint(0, 401, (3, 9), generator=g)
    targets[2, 3:] = -100
    weights = torch.randn(3, 9, generator=g)
    x64 = logits.double().requires_grad_(True)
    ref = reference_logprobs(x64, targets, temperature)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), x64)
    x = logits.clone().requires_grad_(True)
    out = token_logprobs(x, targets, temperature=temperature, chunk_size=4)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert out.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    assert (out[2, 3:] == 0).all() and (grad[2, 3:] == 0).all()


@pytest.mark.parametrize(("dtype", "eps"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=["bf16", "fp16"])
def test_low_precision_logits_with_temperature_match_float64_reference(dtype, eps):
    """A temperature on bf16/fp16 logits: each chunk is upcast, then divided (a quotient in bf16
    would be off by ~0.03 here, 2^-9 of |logit| / T ~ 16). Values to float32 arithmetic (1e-4, as
    for bf16 above); the gradient, in the logits' dtype, to its rounding (unit roundoff `eps`,
    relative, and |grad| <= 1 / T)."""
    g = torch.Generator().manual_seed(9)
    temperature = 0.6
    logits = (torch.randn(2, 6, 300, generator=g) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 300, (2, 6), generator=g)
    targets[0, :2] = -100
    out = token_logprobs(logits, targets, temperature=temperature, chunk_size=5)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    x64 = logits.detach().double().requires_grad_(True)
    ref = reference_logprobs(x64, targets, temperature)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-4, rtol=0)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, atol=eps / temperature, rtol=2 * eps)


@pytest.mark.parametrize(
    ("dtype", "temperature"), [(torch.float32, 1.0), (torch.float32, 2.0), (torch.bfloat16, 1.0), (F64, 1.0)]
)
def test_minus_inf_logits(dtype, temperature):
    """As the naive log_softmax, on every path. Logits (0, 0, -inf, -inf): p = (1/2, 1/2, 0, 0) at
    any temperature; target 1 has log p = ln 1/2 and gradient (-1/2, 1/2, 0, 0) / T; target 2 has
    log p = -inf and a finite gradient (-1/2, -1/2, 1, 0) / T. A row that is -inf throughout has no
    distribution: NaN where supervised, exactly 0 where its target is ignored."""
    inf = math.inf
    logits = torch.tensor([[[0.0, 0.0, -inf, -inf], [0.0, 0.0, -inf, -inf], [-inf] * 4, [-inf] * 4]], dtype=dtype)
    logits.requires_grad_(True)
    targets = torch.tensor([[1, 2, 0, -100]])
    out = token_logprobs(logits, targets, temperature=temperature, chunk_size=3)
    (grad,) = torch.autograd.grad(out[0, :2].sum(), logits)
    assert out[0, 0].item() == pytest.approx(math.log(0.5)) and out[0, 1].item() == -inf
    assert out[0, 2].isnan() and out[0, 3].item() == 0.0
    expected = torch.tensor([[-0.5, 0.5, 0.0, 0.0], [-0.5, -0.5, 1.0, 0.0]], dtype=F64) / temperature
    torch.testing.assert_close(grad[0, :2].double(), expected)


@pytest.mark.parametrize(("dtype", "temperature"), [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_strided_logits_from_a_padded_vocabulary(dtype, temperature):
    """Logits sliced from a wider (padded-vocabulary) tensor have strided rows. Values and the
    gradient, written into the slice of the wide tensor (zero in the padding), match the reference."""
    g = torch.Generator().manual_seed(10)
    wide = (torch.randn(2, 5, 40, generator=g) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 33, (2, 5), generator=g)
    targets[1, 3:] = -100
    out = token_logprobs(wide[..., :33], targets, temperature=temperature, chunk_size=3)
    (grad,) = torch.autograd.grad(out.sum(), wide)
    x64 = wide.detach()[..., :33].double().requires_grad_(True)
    ref = reference_logprobs(x64, targets, temperature)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 8e-3}
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(grad[..., :33].double(), ref_grad, **tol)
    assert (grad[..., 33:] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak-memory check needs CUDA")
def test_cuda_peak_memory_stays_below_a_float32_copy():
    """Forward + backward on (4096, 32000) bf16 logits (250 MiB; a float32 copy is 500 MiB, and the
    naive log_softmax keeps two) with chunk_size=512. Beyond the logits and their bf16 gradient,
    each pass holds one float32 chunk (512 x 32000 x 4 B = 62.5 MiB) at a time; allow two."""
    rows, vocab, chunk_size = 4096, 32_000, 512
    logits = torch.randn(1, rows, vocab, device="cuda").bfloat16().requires_grad_(True)
    targets = torch.randint(0, vocab, (1, rows), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = token_logprobs(logits, targets, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - grad.numel() * grad.element_size()
    assert extra < 2 * chunk_size * vocab * 4, extra / 2**20
    ref = reference_logprobs(logits.detach(), targets)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=0)


def test_entropy_by_hand():
    """Uniform over 4 tokens: H = ln 4. Logits (0, ln 3): p = (1/4, 3/4),
    H = (1/4) ln 4 + (3/4) ln(4/3). A -inf logit has p = 0 and adds nothing (not NaN).
    Masked positions are 0."""
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf], [1.0, 2.0, 3.0, 4.0]]],
        dtype=F64,
    )
    mask = torch.tensor([[1, 1, 0]])
    expected = torch.tensor([[math.log(4.0), 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0), 0.0]], dtype=F64)
    torch.testing.assert_close(token_entropy(logits, mask), expected)
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(token_entropy(x, mask).sum(), x)
    assert torch.isfinite(grad).all()


def test_entropy_matches_float64_reference():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 13, generator=g, dtype=F64) * 2
    for temperature in (1.0, 0.5):
        torch.testing.assert_close(
            token_entropy(logits, temperature=temperature, chunk_size=3), reference_entropy(logits, temperature)
        )


def test_entropy_of_bf16_large_vocab():
    """Entropy is at most ln V ~ 10.8 and built from float32 terms: 1e-4 absolute is ample."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(1, 4, 50_257, generator=g) * 2).bfloat16()
    out = token_entropy(logits, chunk_size=3)
    torch.testing.assert_close(out.double(), reference_entropy(logits), atol=1e-4, rtol=0)


def test_sequence_logprobs_sums_unmasked_tokens():
    """Row 0 keeps -1 and -2 (sum -3); row 1 keeps -0.5 only; NaN on masked positions is ignored."""
    token_logps = torch.tensor([[-1.0, -2.0, float("nan")], [-4.0, -0.5, -3.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    torch.testing.assert_close(sequence_logprobs(token_logps, mask), torch.tensor([-3.0, -0.5], dtype=F64))


def test_rejects_bad_arguments():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy(logits, chunk_size=0)
